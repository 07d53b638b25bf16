// Op 1 on the CPU: fused routing with threshold skipping, and the dispatch plan. The scalar row
// kernel lives here; route_rows hands the rows to the AVX2 one (avx2/route_avx2.cpp) where the
// CPU has it (cpu_level.cpp).
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "moe_fast/kernels.h"
#include "avx2/route_avx2.h"

namespace moe_fast {
namespace cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Selection works on 64-bit keys that order like (logit, -index), the order of ranks_before in
// rules.h, sanitize included: the logit's bits made
// monotone in the high half, the complemented index in the low half. Larger key = larger logit,
// then lower index; a masked expert gets key 0, below every allowed one (-inf included). Keys
// are compared with max/min only, so the loop has no data-dependent branches to mispredict.
inline uint64_t select_key(float v, int32_t e) {
  v = std::fmin(std::fmax(v, kNegInf), FLT_MAX) + 0.0f;  // NaN -> -inf, +inf -> max, -0 -> +0
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  u ^= static_cast<uint32_t>(-static_cast<int32_t>(u >> 31)) | 0x80000000u;
  return (static_cast<uint64_t>(u) << 32) | static_cast<uint32_t>(~e);
}

inline float key_value(uint64_t key) {
  uint32_t u = static_cast<uint32_t>(key >> 32);
  u ^= ((u >> 31) != 0u) ? 0x80000000u : 0xFFFFFFFFu;
  float v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

inline int32_t key_index(uint64_t key, int32_t num_experts) {
  return key == 0 ? num_experts : static_cast<int32_t>(~static_cast<uint32_t>(key));
}

// Top-K of one row among allowed experts, largest first, ties to the lower index.
// Returns how many allowed experts there are.
template <int K, typename scalar_t>
inline int32_t select_topk(const scalar_t* row, int32_t num_experts, const uint8_t* keep, float* top_v,
                           int32_t* top_i) {
  uint64_t top[K];
  for (int j = 0; j < K; ++j) top[j] = 0;
  int32_t allowed = 0;
  for (int32_t e = 0; e < num_experts; ++e) {
    const uint64_t ok = keep == nullptr || keep[e] != 0 ? ~uint64_t{0} : 0;
    allowed += static_cast<int32_t>(ok & 1u);
    uint64_t key = select_key(to_float(row[e]), e) & ok;
    for (int j = 0; j < K; ++j) {  // one pass of insertion, as max/min exchanges
      const uint64_t hi = key > top[j] ? key : top[j];
      key = key > top[j] ? top[j] : key;
      top[j] = hi;
    }
  }
  for (int j = 0; j < K; ++j) {
    top_v[j] = top[j] == 0 ? kNegInf : key_value(top[j]);
    top_i[j] = key_index(top[j], num_experts);
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

template <int K, typename scalar_t>
void route_rows_k(const scalar_t* logits, const RouteArgs& a, int64_t t_begin, int64_t t_end,
                  float* weights, int32_t* ids) {
  const int32_t E = a.num_experts;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const scalar_t* row = logits + t * E;
    // A row with fewer than K allowed experts (the bindings reject it) gets id E in the rest.
    float top_v[K];
    int32_t top_i[K];
    const int32_t allowed = select_topk<K>(row, E, a.keep, top_v, top_i);
    // A row with no finite allowed logit is taken as all-equal logits.
    const bool degenerate = top_v[0] == kNegInf;
    if (degenerate) {
      for (int j = 0; j < K; ++j) top_v[j] = 0.f;
    }
    // z: softmax partition over the allowed experts relative to l_0, only for weights that are
    // not renormalized.
    const double z = a.renormalize ? 0.0 : degenerate ? static_cast<double>(allowed)
                                                     : partition_sum(row, E, a.keep, top_v[0]);
    bool skipped[K];
    route_slot_weights(top_v, K, a.skip_gap != nullptr, a.skip_gap, a.renormalize, z, weights + t * K, skipped);
    int32_t* i_out = ids + t * K;
    for (int j = 0; j < K; ++j) i_out[j] = skipped[j] ? E : top_i[j];
  }
}

template <typename scalar_t>
void route_rows_typed(const scalar_t* logits, const RouteArgs& a, int64_t t_begin, int64_t t_end,
                      float* weights, int32_t* ids) {
  MOE_FAST_DISPATCH_TOP_K(a.top_k, return, return route_rows_k<K>(logits, a, t_begin, t_end, weights, ids))  // bindings reject other k
}

void route_rows_scalar(DType dtype, const void* logits, const RouteArgs& args, int64_t t_begin, int64_t t_end,
                       float* weights, int32_t* ids) {
  MOE_FAST_DISPATCH_DTYPE(dtype, return,
                         return route_rows_typed(static_cast<const scalar_t*>(logits), args, t_begin, t_end, weights, ids))
}

}  // namespace

void route_rows_at(CpuLevel level, DType dtype, const void* logits, const RouteArgs& args, int64_t t_begin,
                   int64_t t_end, float* weights, int32_t* ids) {
  if (level == CpuLevel::Avx2 && cpu_level_supported(CpuLevel::Avx2) &&
      route_rows_avx2(dtype, logits, args, t_begin, t_end, weights, ids)) {
    return;
  }
  route_rows_scalar(dtype, logits, args, t_begin, t_end, weights, ids);
}

void route_rows(DType dtype, const void* logits, const RouteArgs& args, int64_t t_begin,
                int64_t t_end, float* weights, int32_t* ids) {
  route_rows_at(route_cpu_level(), dtype, logits, args, t_begin, t_end, weights, ids);
}

// Both plan passes count into a local copy: the callers' per-range arrays sit side by side, and
// threads incrementing them in place would fight over the same cache lines.
void plan_histogram(const int32_t* ids, int64_t t_begin, int64_t t_end, int32_t top_k,
                    int32_t num_experts, int32_t* counts) {
  int32_t local[kMaxExperts + 1] = {0};
  for (int64_t s = t_begin * top_k; s < t_end * top_k; ++s) ++local[ids[s]];
  for (int32_t b = 0; b <= num_experts; ++b) counts[b] += local[b];
}

void plan_scatter(const int32_t* ids, int64_t t_begin, int64_t t_end, int32_t top_k,
                  int32_t num_experts, int32_t* cursor, int32_t* perm) {
  int32_t local[kMaxExperts + 1];
  for (int32_t b = 0; b <= num_experts; ++b) local[b] = cursor[b];
  for (int64_t s = t_begin * top_k; s < t_end * top_k; ++s) perm[local[ids[s]]++] = static_cast<int32_t>(s);
  for (int32_t b = 0; b <= num_experts; ++b) cursor[b] = local[b];
}

Error route(DType dtype, const void* logits, const RouteArgs& args, float* weights, int32_t* ids,
            int32_t* counts, int32_t* offsets, int32_t* perm) {
  if (const Error err = validate_route(args)) return err;
  const int32_t E = args.num_experts;
  if (args.keep != nullptr) {
    if (count_nonzero(args.keep, E) < args.top_k) return "route: keep allows fewer than k experts";
  }
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
  return nullptr;
}

}  // namespace cpu
}  // namespace moe_fast
