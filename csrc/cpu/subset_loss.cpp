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
    if (target != nullptr) {
      const float* z = as_float_row(target + t * h, h, zbuf);
      for (int64_t i = 0; i < m; ++i) cross[t * m + i] = dot(y + i * h, z, h);
      target_sq[t] = dot(z, z, h);
    }
  }
}

inline bool mask_has(const ExpertMask& mask, int32_t e) {
  return (mask.words[e >> 6] >> (e & 63)) & 1u;
}

inline float sanitize(float v) {
  if (v != v) return kNegInf;
  if (v == std::numeric_limits<float>::infinity()) return std::numeric_limits<float>::max();
  return v;
}

// Squared error of one token under one candidate.
inline double token_error(const SubsetLossArgs& a, const ExpertMask& mask, int64_t t) {
  const int32_t m = a.rank;
  const int32_t k = a.top_k;
  const int32_t* ids = a.ids + t * m;
  const float* lg = a.logits + t * static_cast<int64_t>(a.num_experts);
  // The first k ranked experts that the candidate keeps, and their weights.
  int32_t slot[kMaxTopK];
  double w[kMaxTopK];
  int32_t n = 0;
  for (int32_t i = 0; i < m && n < k; ++i) {
    if (mask_has(mask, ids[i])) slot[n++] = i;
  }
  float l0 = sanitize(lg[ids[slot[0]]]);
  const bool degenerate = l0 == kNegInf;  // no finite kept logit: all taken as equal
  if (degenerate) l0 = 0.f;
  double sum = 0.0;
  for (int32_t j = 0; j < n; ++j) {
    const float lj = degenerate ? 0.f : sanitize(lg[ids[slot[j]]]);
    w[j] = j == 0 ? 1.0 : std::exp(static_cast<double>(lj) - l0);
    sum += w[j];
  }
  double scale = 1.0 / sum;
  if (!a.renormalize) {
    double z = 0.0;
    for (int32_t e = 0; e < a.num_experts; ++e) {
      if (mask_has(mask, e)) z += degenerate ? 1.0 : std::exp(static_cast<double>(sanitize(lg[e])) - l0);
    }
    scale = 1.0 / z;
  }
  for (int32_t j = 0; j < n; ++j) w[j] *= scale;

  const float* g = a.gram + t * (static_cast<int64_t>(m) * (m + 1) / 2);
  if (a.target_weights != nullptr) {
    // d = w^S - target over the M ranked slots; at most 2k entries are nonzero.
    const float* tw = a.target_weights + t * m;
    int32_t pos[2 * kMaxTopK];
    double d[2 * kMaxTopK];
    int32_t nd = 0;
    int32_t next = 0;  // walks slot[] alongside i (slot is ascending)
    for (int32_t i = 0; i < m; ++i) {
      double v = -static_cast<double>(tw[i]);
      if (next < n && slot[next] == i) v += w[next++];
      if (v != 0.0) {
        pos[nd] = i;
        d[nd++] = v;
      }
      if (nd == 2 * kMaxTopK) break;  // cannot happen for a valid target (<= k nonzeros)
    }
    double err = 0.0;
    for (int32_t x = 0; x < nd; ++x) {
      err += d[x] * d[x] * g[gram_index(pos[x], pos[x], m)];
      for (int32_t y = x + 1; y < nd; ++y) err += 2.0 * d[x] * d[y] * g[gram_index(pos[x], pos[y], m)];
    }
    return err;
  }
  const float* c = a.cross + t * m;
  double err = a.target_sq[t];
  for (int32_t x = 0; x < n; ++x) {
    err -= 2.0 * w[x] * c[slot[x]];
    err += w[x] * w[x] * g[gram_index(slot[x], slot[x], m)];
    for (int32_t y = x + 1; y < n; ++y) err += 2.0 * w[x] * w[y] * g[gram_index(slot[x], slot[y], m)];
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

ExpertMask pack_mask(const uint8_t* keep, int32_t num_experts) {
  ExpertMask mask{};
  for (int32_t e = 0; e < num_experts; ++e) {
    if (keep[e] != 0) mask.words[e >> 6] |= uint64_t{1} << (e & 63);
  }
  return mask;
}

double subset_loss_tokens(const SubsetLossArgs& args, const ExpertMask& mask, const int64_t* tokens,
                          int64_t n) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += token_error(args, mask, tokens[i]);
  return sum;
}

void subset_loss(const SubsetLossArgs& args, const uint8_t* keep, int64_t num_candidates,
                 const int64_t* group, int64_t num_groups, double* out) {
  // Tokens bucketed by group, ascending inside each group.
  std::vector<int64_t> start(num_groups + 1, 0);
  for (int64_t t = 0; t < args.num_tokens; ++t) ++start[group[t] + 1];
  for (int64_t g = 0; g < num_groups; ++g) start[g + 1] += start[g];
  std::vector<int64_t> order(args.num_tokens);
  std::vector<int64_t> cursor(start.begin(), start.end() - 1);
  for (int64_t t = 0; t < args.num_tokens; ++t) order[cursor[group[t]]++] = t;
  for (int64_t c = 0; c < num_candidates; ++c) {
    const ExpertMask mask = pack_mask(keep + c * args.num_experts, args.num_experts);
    for (int64_t g = 0; g < num_groups; ++g) {
      double total = 0.0;
      for (int64_t i = start[g]; i < start[g + 1]; i += kLossChunk) {
        const int64_t n = std::min(kLossChunk, start[g + 1] - i);
        total += subset_loss_tokens(args, mask, order.data() + i, n);
      }
      out[c * num_groups + g] = total;
    }
  }
}

}  // namespace cpu
}  // namespace moe_fast
