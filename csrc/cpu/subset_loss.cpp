// Op 2 on the CPU: per-token Gram entries, and the batched subset-loss evaluator.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "moe_fast/kernels.h"

namespace moe_fast {
namespace cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Dot product with independent partial sums so the compiler can vectorize without reassociating.
inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

template <typename scalar_t>
inline const float* as_float_row(const scalar_t* src, int64_t n, std::vector<float>& scratch) {
  scratch.resize(n);
  for (int64_t i = 0; i < n; ++i) scratch[i] = to_float(src[i]);
  return scratch.data();
}
inline const float* as_float_row(const float* src, int64_t, std::vector<float>&) { return src; }

template <typename scalar_t>
void gram_rows_typed(const scalar_t* outputs, const scalar_t* target, int64_t m, int64_t h,
                     int64_t t_begin, int64_t t_end, float* gram, float* cross, float* target_sq) {
  const int64_t p = m * (m + 1) / 2;
  std::vector<float> ybuf, zbuf;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const float* y = as_float_row(outputs + t * m * h, m * h, ybuf);
    float* g = gram + t * p;
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = i; j < m; ++j) g[gram_index(i, j, m)] = dot(y + i * h, y + j * h, h);
    }
    if (cross != nullptr) {  // target mode (target is nullptr only when h == 0: then all zeros)
      const float* z = h == 0 ? y : as_float_row(target + t * h, h, zbuf);
      for (int64_t i = 0; i < m; ++i) cross[t * m + i] = dot(y + i * h, z, h);
      target_sq[t] = dot(z, z, h);
    }
  }
}

// Per-token quantities shared by every candidate: exp(l - l_top) of the ranked experts (and of
// all experts when weights are not renormalized), or their sigmoid scores, so that a candidate
// needs no exp() at all.
struct TokenCache {
  bool usable = false;                // false: degenerate row, use the exact per-candidate path
  double ranked[kMaxExperts];         // exp(l_ids[i] - l_ids[0]); sigmoid: the float32 score of ids[i]
  double all[kMaxExperts];            // exp(l_e - l_ids[0]), only when !renormalize
  int32_t target_pos[kMaxExperts];    // layer-wise: ranked slots where the target weight != 0
  double target_val[kMaxExperts];
  int32_t target_n = 0;
};

inline void fill_cache(const SubsetLossArgs& a, int64_t t, TokenCache& cache) {
  const int32_t* ids = a.ids + t * a.rank;
  const float* lg = a.logits + t * static_cast<int64_t>(a.num_experts);
  if (a.target_weights != nullptr) {
    const float* tw = a.target_weights + t * a.rank;
    cache.target_n = 0;
    for (int32_t i = 0; i < a.rank; ++i) {
      if (tw[i] != 0.f) {
        cache.target_pos[cache.target_n] = i;
        cache.target_val[cache.target_n++] = tw[i];
      }
    }
  }
  if (a.scoring == Scoring::Sigmoid) {
    cache.usable = true;
    for (int32_t i = 0; i < a.rank; ++i) cache.ranked[i] = sigmoid_score(sanitize(lg[ids[i]]));
    return;
  }
  const double top = sanitize(lg[ids[0]]);
  cache.usable = top != -std::numeric_limits<double>::infinity();
  if (!cache.usable) return;
  for (int32_t i = 0; i < a.rank; ++i) cache.ranked[i] = std::exp(static_cast<double>(sanitize(lg[ids[i]])) - top);
  if (!softmax_over_chosen(a.scoring, a.renormalize)) {
    for (int32_t e = 0; e < a.num_experts; ++e) cache.all[e] = std::exp(static_cast<double>(sanitize(lg[e])) - top);
  }
}

// Below this the cached exponentials may have underflowed: recompute relative to the kept top.
constexpr double kTinySum = 1e-280;

// Softmax weights w[0..n) of the candidate's experts at ranked positions slot[0..n) (divided by
// the chosen experts' sum when `renormalize`). Uses the cache when it is exact enough, else exp()
// relative to the kept top logit.
inline void softmax_weights(const SubsetLossArgs& a, bool renormalize, const ExpertMask& mask, int64_t t,
                            const TokenCache& cache, const int32_t* slot, int32_t n, double* w) {
  const int32_t* ids = a.ids + t * a.rank;
  if (cache.usable) {
    double denom = 0.0;
    if (renormalize) {
      for (int32_t j = 0; j < n; ++j) denom += cache.ranked[slot[j]];
    } else {
      for (int32_t e = 0; e < a.num_experts; ++e) {
        if (mask_has(mask, e)) denom += cache.all[e];
      }
    }
    if (denom > kTinySum) {
      for (int32_t j = 0; j < n; ++j) w[j] = cache.ranked[slot[j]] / denom;
      return;
    }
  }
  const float* lg = a.logits + t * static_cast<int64_t>(a.num_experts);
  float l0 = sanitize(lg[ids[slot[0]]]);
  const bool degenerate = l0 == kNegInf;  // no finite kept logit: all taken as equal
  if (degenerate) l0 = 0.f;
  double sum = 0.0;
  for (int32_t j = 0; j < n; ++j) {
    const float lj = degenerate ? 0.f : sanitize(lg[ids[slot[j]]]);
    w[j] = j == 0 ? 1.0 : std::exp(static_cast<double>(lj) - l0);
    sum += w[j];
  }
  if (!renormalize) {
    sum = 0.0;
    for (int32_t e = 0; e < a.num_experts; ++e) {
      if (mask_has(mask, e)) sum += degenerate ? 1.0 : std::exp(static_cast<double>(sanitize(lg[e])) - l0);
    }
  }
  for (int32_t j = 0; j < n; ++j) w[j] /= sum;
}

// Weights w[0..n) of the first k ranked experts that the candidate keeps, at ranked positions
// slot[0..n), as the router's scoring weighs them, times its scaling.
inline int32_t candidate_weights(const SubsetLossArgs& a, const ExpertMask& mask, int64_t t,
                                 const TokenCache& cache, int32_t* slot, double* w) {
  const int32_t n = kept_ranked_slots(mask, a.ids + t * a.rank, a.rank, a.top_k, slot);
  if (a.scoring == Scoring::Sigmoid) {
    for (int32_t j = 0; j < n; ++j) w[j] = cache.ranked[slot[j]];
    sigmoid_subset_weights(w, n, a.renormalize);
  } else {
    softmax_weights(a, softmax_over_chosen(a.scoring, a.renormalize), mask, t, cache, slot, n, w);
  }
  if (a.scaling != 1.0) {
    for (int32_t j = 0; j < n; ++j) w[j] *= a.scaling;
  }
  return n;
}

// Squared error of one token under one candidate, from the candidate's weights.
inline double token_error(const SubsetLossArgs& a, int64_t t, const TokenCache& cache, const int32_t* slot,
                          const double* w, int32_t n) {
  const int32_t m = a.rank;
  const float* g = a.gram + t * (static_cast<int64_t>(m) * (m + 1) / 2);
  if (a.target_weights != nullptr) {
    // d = w^S - target over the M ranked slots: nonzero only on the candidate's slots and the
    // target's (at most k each for a routing target); merge the two ascending lists.
    int32_t pos[kMaxTopK + kMaxExperts];
    double d[kMaxTopK + kMaxExperts];
    int32_t nd = 0, x = 0, y = 0;
    const int32_t nt = cache.target_n;
    while (x < n || y < nt) {
      const int32_t px = x < n ? slot[x] : m, py = y < nt ? cache.target_pos[y] : m;
      const int32_t p = px < py ? px : py;
      double v = 0.0;
      if (px == p) v += w[x++];
      if (py == p) v -= cache.target_val[y++];
      if (v != 0.0) {
        pos[nd] = p;
        d[nd++] = v;
      }
    }
    double err = 0.0;
    for (int32_t i = 0; i < nd; ++i) {
      double row = 0.5 * d[i] * g[gram_index(pos[i], pos[i], m)];
      for (int32_t j = i + 1; j < nd; ++j) row += d[j] * g[gram_index(pos[i], pos[j], m)];
      err += 2.0 * d[i] * row;
    }
    return err;
  }
  const float* c = a.cross + t * m;
  double err = a.target_sq[t];
  for (int32_t x = 0; x < n; ++x) {
    double row = 0.5 * w[x] * g[gram_index(slot[x], slot[x], m)];
    for (int32_t y = x + 1; y < n; ++y) row += w[y] * g[gram_index(slot[x], slot[y], m)];
    err += 2.0 * w[x] * (row - c[slot[x]]);
  }
  return err;
}

}  // namespace

void expert_gram_rows(DType dtype, const void* outputs, const void* target, int64_t rank,
                      int64_t hidden, int64_t t_begin, int64_t t_end, float* gram, float* cross,
                      float* target_sq) {
  switch (dtype) {
    case DType::Float32:
      return gram_rows_typed(static_cast<const float*>(outputs), static_cast<const float*>(target), rank,
                             hidden, t_begin, t_end, gram, cross, target_sq);
    case DType::BFloat16:
      return gram_rows_typed(static_cast<const bf16_t*>(outputs), static_cast<const bf16_t*>(target), rank,
                             hidden, t_begin, t_end, gram, cross, target_sq);
    case DType::Float16:
      return gram_rows_typed(static_cast<const fp16_t*>(outputs), static_cast<const fp16_t*>(target), rank,
                             hidden, t_begin, t_end, gram, cross, target_sq);
  }
}

Error expert_gram(DType dtype, const void* outputs, const void* target, int64_t num_tokens, int64_t rank,
                  int64_t hidden, float* gram, float* cross, float* target_sq) {
  if (const Error err = validate_expert_gram(outputs, target, num_tokens, rank, hidden, gram, cross, target_sq)) {
    return err;
  }
  expert_gram_rows(dtype, outputs, target, rank, hidden, 0, num_tokens, gram, cross, target_sq);
  return nullptr;
}

ExpertMask pack_mask(const uint8_t* keep, int32_t num_experts) {
  ExpertMask mask{};
  for (int32_t e = 0; e < num_experts; ++e) {
    if (keep[e] != 0) mask.words[e >> 6] |= uint64_t{1} << (e & 63);
  }
  return mask;
}

void subset_loss_tokens(const SubsetLossArgs& args, const ExpertMask* masks, int64_t num_candidates,
                        const int64_t* tokens, int64_t n, double* sums) {
  TokenCache cache;
  int32_t slot[kMaxTopK];
  double w[kMaxTopK];
  for (int64_t c = 0; c < num_candidates; ++c) sums[c] = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = tokens[i];
    fill_cache(args, t, cache);
    for (int64_t c = 0; c < num_candidates; ++c) {
      const int32_t nw = candidate_weights(args, masks[c], t, cache, slot, w);
      sums[c] += token_error(args, t, cache, slot, w, nw);
    }
  }
}

Error subset_loss(const SubsetLossArgs& args, const uint8_t* keep, int64_t num_candidates,
                  const int64_t* group, int64_t num_groups, double* out) {
  if (const Error err = validate_subset_loss(args, num_candidates, num_groups)) return err;
  if (const Error err = validate_subset_loss_data(args, keep, num_candidates, group, num_groups)) return err;
  std::vector<int64_t> start, order;
  group_order(group, args.num_tokens, num_groups, start, order);
  std::vector<LossChunk> chunks;
  std::vector<int64_t> first_chunk;
  build_loss_chunks(start.data(), num_groups, chunks, first_chunk);
  std::vector<ExpertMask> masks(num_candidates);
  for (int64_t c = 0; c < num_candidates; ++c) masks[c] = pack_mask(keep + c * args.num_experts, args.num_experts);
  std::vector<double> sums(num_candidates);
  std::fill(out, out + num_candidates * num_groups, 0.0);
  for (int64_t g = 0; g < num_groups; ++g) {
    for (int64_t i = first_chunk[g]; i < first_chunk[g + 1]; ++i) {
      const LossChunk& ch = chunks[i];
      subset_loss_tokens(args, masks.data(), num_candidates, order.data() + ch.begin, ch.end - ch.begin, sums.data());
      for (int64_t c = 0; c < num_candidates; ++c) out[c * num_groups + g] += sums[c];
    }
  }
  return nullptr;
}

}  // namespace cpu
}  // namespace moe_fast
