// Op 1 on the CPU: fused routing with threshold skipping, and the dispatch plan.
#include <cfloat>
#include <cmath>
#include <limits>
#include <vector>

#include "moe_fast/kernels.h"

namespace moe_fast {
namespace cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// NaN never wins (-inf); +inf becomes the largest finite float so that softmax stays defined.
inline float sanitize(float v) {
  if (v != v) return kNegInf;
  if (v == std::numeric_limits<float>::infinity()) return FLT_MAX;
  return v;
}

// Top-K of one row among allowed experts: largest first, ties to the lower index.
// Returns how many allowed experts there are.
template <int K, typename scalar_t>
inline int32_t select_topk(const scalar_t* row, int32_t num_experts, const uint8_t* keep,
                           float* top_v, int32_t* top_i) {
  int32_t count = 0;
  int32_t allowed = 0;
  for (int32_t e = 0; e < num_experts; ++e) {
    if (keep != nullptr && keep[e] == 0) continue;
    ++allowed;
    const float v = sanitize(to_float(row[e]));
    if (count == K && !(v > top_v[K - 1])) continue;
    // Strict '>' keeps earlier (lower) indices ahead on ties.
    int32_t p = count < K ? count : K - 1;
    while (p > 0 && v > top_v[p - 1]) {
      top_v[p] = top_v[p - 1];
      top_i[p] = top_i[p - 1];
      --p;
    }
    top_v[p] = v;
    top_i[p] = e;
    if (count < K) ++count;
  }
  return allowed;
}

// Sum over allowed experts of exp(l_e - l_max), for weights that are not renormalized.
template <typename scalar_t>
inline double partition_sum(const scalar_t* row, int32_t num_experts, const uint8_t* keep,
                            float l_max) {
  double z = 0.0;
  for (int32_t e = 0; e < num_experts; ++e) {
    if (keep != nullptr && keep[e] == 0) continue;
    z += std::exp(static_cast<double>(sanitize(to_float(row[e]))) - l_max);
  }
  return z;
}

// K = 2 without branches on the data: two running maxima updated with selects.
template <typename scalar_t>
inline int32_t select_top2(const scalar_t* row, int32_t num_experts, const uint8_t* keep, float* top_v,
                           int32_t* top_i) {
  float v0 = kNegInf, v1 = kNegInf;
  int32_t i0 = -1, i1 = -1;
  int32_t allowed = 0;
  for (int32_t e = 0; e < num_experts; ++e) {
    const bool ok = keep == nullptr || keep[e] != 0;
    const float v = sanitize(to_float(row[e]));
    // An unfilled slot (-1) takes any allowed expert, so -inf logits still fill both slots.
    const bool gt0 = ok && (v > v0 || i0 < 0);
    const bool gt1 = ok && !gt0 && (v > v1 || i1 < 0);
    v1 = gt0 ? v0 : (gt1 ? v : v1);
    i1 = gt0 ? i0 : (gt1 ? e : i1);
    v0 = gt0 ? v : v0;
    i0 = gt0 ? e : i0;
    allowed += ok ? 1 : 0;
  }
  top_v[0] = v0;
  top_v[1] = v1;
  top_i[0] = i0 < 0 ? num_experts : i0;
  top_i[1] = i1 < 0 ? num_experts : i1;
  return allowed;
}

template <int K, typename scalar_t>
inline int32_t select(const scalar_t* row, int32_t num_experts, const uint8_t* keep, float* top_v, int32_t* top_i) {
  if constexpr (K == 2) {
    return select_top2(row, num_experts, keep, top_v, top_i);
  } else {
    return select_topk<K>(row, num_experts, keep, top_v, top_i);
  }
}

template <int K, typename scalar_t>
void route_rows_k(const scalar_t* logits, const RouteArgs& a, int64_t t_begin, int64_t t_end,
                  float* weights, int32_t* ids) {
  const int32_t E = a.num_experts;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const scalar_t* row = logits + t * E;
    // Preset so that a row with fewer than K allowed experts (the bindings reject it) stays defined.
    float top_v[K];
    int32_t top_i[K];
    for (int j = 0; j < K; ++j) {
      top_v[j] = kNegInf;
      top_i[j] = E;
    }
    const int32_t allowed = select<K>(row, E, a.keep, top_v, top_i);
    // A row with no finite allowed logit is taken as all-equal logits.
    const bool degenerate = top_v[0] == kNegInf;
    if (degenerate) {
      for (int j = 0; j < K; ++j) top_v[j] = 0.f;
    }
    double rel[K];  // exp(l_j - l_0)
    bool skipped[K];
    double kept_sum = 0.0, topk_sum = 0.0;
    for (int j = 0; j < K; ++j) {
      rel[j] = j == 0 ? 1.0 : std::exp(static_cast<double>(top_v[j]) - top_v[0]);
      skipped[j] = j > 0 && a.skip_gap != nullptr &&
                   static_cast<double>(top_v[0]) - static_cast<double>(top_v[j]) > a.skip_gap[j];
      topk_sum += rel[j];
      if (!skipped[j]) kept_sum += rel[j];
    }
    double scale;
    if (a.renormalize) {
      scale = 1.0 / kept_sum;
    } else {
      const double z = degenerate ? static_cast<double>(allowed) : partition_sum(row, E, a.keep, top_v[0]);
      scale = topk_sum / (kept_sum * z);
    }
    float* w_out = weights + t * K;
    int32_t* i_out = ids + t * K;
    for (int j = 0; j < K; ++j) {
      w_out[j] = skipped[j] ? 0.f : static_cast<float>(rel[j] * scale);
      i_out[j] = skipped[j] ? E : top_i[j];
    }
  }
}

template <typename scalar_t>
void route_rows_typed(const scalar_t* logits, const RouteArgs& a, int64_t t_begin, int64_t t_end,
                      float* weights, int32_t* ids) {
  switch (a.top_k) {
#define MOE_FAST_ROUTE_CASE(K) \
  case K:                      \
    return route_rows_k<K>(logits, a, t_begin, t_end, weights, ids);
    MOE_FAST_ROUTE_CASE(1)
    MOE_FAST_ROUTE_CASE(2)
    MOE_FAST_ROUTE_CASE(3)
    MOE_FAST_ROUTE_CASE(4)
    MOE_FAST_ROUTE_CASE(5)
    MOE_FAST_ROUTE_CASE(6)
    MOE_FAST_ROUTE_CASE(7)
    MOE_FAST_ROUTE_CASE(8)
#undef MOE_FAST_ROUTE_CASE
    default:
      return;  // the bindings reject k outside 1..8
  }
}

}  // namespace

void route_rows(DType dtype, const void* logits, const RouteArgs& args, int64_t t_begin,
                int64_t t_end, float* weights, int32_t* ids) {
  switch (dtype) {
    case DType::Float32:
      return route_rows_typed(static_cast<const float*>(logits), args, t_begin, t_end, weights, ids);
    case DType::BFloat16:
      return route_rows_typed(static_cast<const bf16_t*>(logits), args, t_begin, t_end, weights, ids);
    case DType::Float16:
      return route_rows_typed(static_cast<const fp16_t*>(logits), args, t_begin, t_end, weights, ids);
  }
}

void plan_histogram(const int32_t* ids, int64_t t_begin, int64_t t_end, int32_t top_k,
                    int32_t num_experts, int32_t* counts) {
  (void)num_experts;
  for (int64_t s = t_begin * top_k; s < t_end * top_k; ++s) ++counts[ids[s]];
}

void plan_scatter(const int32_t* ids, int64_t t_begin, int64_t t_end, int32_t top_k,
                  int32_t num_experts, int32_t* cursor, int32_t* perm) {
  (void)num_experts;
  for (int64_t s = t_begin * top_k; s < t_end * top_k; ++s) perm[cursor[ids[s]]++] = static_cast<int32_t>(s);
}

void route(DType dtype, const void* logits, const RouteArgs& args, float* weights, int32_t* ids,
           int32_t* counts, int32_t* offsets, int32_t* perm) {
  const int32_t E = args.num_experts;
  route_rows(dtype, logits, args, 0, args.num_tokens, weights, ids);
  std::vector<int32_t> hist(E + 1, 0);
  plan_histogram(ids, 0, args.num_tokens, args.top_k, E, hist.data());
  std::vector<int32_t> cursor(E + 1, 0);
  int32_t running = 0;
  for (int32_t b = 0; b <= E; ++b) {
    cursor[b] = running;
    if (b < E) {
      counts[b] = hist[b];
      offsets[b] = running;
    }
    running += hist[b];
  }
  offsets[E] = cursor[E];
  plan_scatter(ids, 0, args.num_tokens, args.top_k, E, cursor.data(), perm);
}

}  // namespace cpu
}  // namespace moe_fast
