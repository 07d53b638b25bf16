// Op 1's row kernel with AVX2 + FMA + F16C: eight tokens per register, one lane per token.
//
// Every file in csrc/cpu/avx2/ is compiled with -mavx2 -mfma -mf16c (setup.py, CMakeLists.txt)
// while the rest of the build stays baseline x86-64; csrc/cpu/route.cpp calls this kernel only
// when the CPU has those instructions (cpu::route_cpu_level), as ATen dispatches its kernels.
//
// One rule keeps that safe: this file must not emit an inline function that a baseline file
// emits too, since the linker keeps one copy of each and may keep this one (an AVX2 instruction
// in code that every CPU runs). So no inline function of a header is called here and no std::
// template is used; everything local has internal linkage (anonymous namespace). Only types and
// constants come from the headers. ctest's avx2_object_is_self_contained checks the object.
//
// The arithmetic follows the scalar kernel (route.cpp, rules.h) operation for operation:
//   * selection on int32 keys that order like sanitized logits (NaN -> -inf, +inf -> FLT_MAX,
//     -0 -> +0), experts scanned in ascending order and inserted on a strictly larger key, so
//     ties go to the lower index: ids and skip decisions are bit-identical;
//   * weights in float64 in the same order, with exp() of our own (below) instead of libm's:
//     within an ulp of it in float64, so the float32 weights differ at most in rare roundings.
#include "route_avx2.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

namespace moe_fast {
namespace cpu {
namespace {

constexpr int kLanes = 8;  // tokens per block: one per float32 lane of a ymm register

// Eight consecutive logits of one row as float32 (exact for bf16 and fp16).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const fp16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// rules.h's sanitize on eight lanes, plus -0 -> +0 so that equal logits have equal keys.
inline __m256 sanitize8(__m256 v) {
  v = _mm256_max_ps(v, _mm256_set1_ps(-__builtin_inff()));  // NaN -> -inf (max returns operand 2)
  v = _mm256_min_ps(v, _mm256_set1_ps(__FLT_MAX__));        // +inf -> FLT_MAX
  return _mm256_add_ps(v, _mm256_setzero_ps());              // -0 -> +0
}

// float bits -> int32 that compares (signed) like the float; its own inverse.
inline __m256i order_key(__m256i bits) { return _mm256_xor_si256(bits, _mm256_srli_epi32(_mm256_srai_epi32(bits, 31), 1)); }

// In-register transpose of an 8x8 block: r[i][j] -> r[j][i].
inline void transpose8(__m256 (&r)[kLanes]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// The sanitized logits of eight rows (row stride E), transposed: cols[e * 8 + lane].
template <typename scalar_t>
inline void load_block(const scalar_t* rows, int32_t E, float* cols) {
  int32_t e = 0;
  for (; e + kLanes <= E; e += kLanes) {
    __m256 r[kLanes];
    for (int i = 0; i < kLanes; ++i) r[i] = load8(rows + static_cast<int64_t>(i) * E + e);
    transpose8(r);
    for (int i = 0; i < kLanes; ++i) _mm256_store_ps(cols + (e + i) * kLanes, sanitize8(r[i]));
  }
  for (; e < E; ++e) {  // the last E % 8 experts, one column at a time
    alignas(16) scalar_t col[kLanes];
    for (int i = 0; i < kLanes; ++i) col[i] = rows[static_cast<int64_t>(i) * E + e];
    _mm256_store_ps(cols + e * kLanes, sanitize8(load8(col)));
  }
}

// exp(x) for x <= 0 in float64, within an ulp: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its
// Taylor series to degree 13 (truncation < 2^-57), times 2^n. Below -708 it returns 0: the
// callers scale such a term by at most k and round it to float32 (0) or add it to a sum >= 1.
inline __m256d exp_nonpositive(__m256d x) {
  const __m256d lowest = _mm256_set1_pd(-708.0);
  const __m256d tiny = _mm256_cmp_pd(x, lowest, _CMP_LT_OQ);
  x = _mm256_max_pd(x, lowest);
  const __m256d n = _mm256_round_pd(_mm256_mul_pd(x, _mm256_set1_pd(1.4426950408889634)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(6.93147180369123816490e-01), x);  // ln2 high part
  r = _mm256_fnmadd_pd(n, _mm256_set1_pd(1.90821492927058770002e-10), r);          // ln2 low part
  static constexpr double kInvFactorial[14] = {1.0,
                                               1.0,
                                               1.0 / 2,
                                               1.0 / 6,
                                               1.0 / 24,
                                               1.0 / 120,
                                               1.0 / 720,
                                               1.0 / 5040,
                                               1.0 / 40320,
                                               1.0 / 362880,
                                               1.0 / 3628800,
                                               1.0 / 39916800,
                                               1.0 / 479001600,
                                               1.0 / 6227020800.0};
  __m256d p = _mm256_set1_pd(kInvFactorial[13]);
  for (int i = 12; i >= 0; --i) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(kInvFactorial[i]));
  const __m256i n64 = _mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(n));
  const __m256d two_n = _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_add_epi64(n64, _mm256_set1_epi64x(1023)), 52));
  return _mm256_andnot_pd(tiny, _mm256_mul_pd(p, two_n));
}

inline __m256d half_to_pd(__m256 v, int h) {
  return _mm256_cvtps_pd(h == 0 ? _mm256_castps256_ps128(v) : _mm256_extractf128_ps(v, 1));
}

// What stays fixed over one call: the arguments and the allowed experts in ascending order.
struct Plan {
  const RouteArgs* args;
  const int32_t* allowed;
  int32_t num_allowed;
};

// Routes the eight rows at `rows` (row stride E); writes lanes [0, valid) to weights/ids.
template <int K, typename scalar_t>
void route_block(const scalar_t* rows, const Plan& plan, float* cols, int valid, float* weights, int32_t* ids) {
  const RouteArgs& a = *plan.args;
  const int32_t E = a.num_experts;
  load_block(rows, E, cols);

  // Top-K by key, largest first. An expert comes after every expert already held, so it enters
  // slot j only on a strictly larger key; the slots it passes shift down by one.
  __m256i key[K], idx[K];
  for (int j = 0; j < K; ++j) {
    key[j] = _mm256_set1_epi32(INT32_MIN);  // below every allowed expert, -inf included
    idx[j] = _mm256_set1_epi32(E);
  }
  for (int32_t n = 0; n < plan.num_allowed; ++n) {
    const int32_t e = plan.allowed[n];
    const __m256i k_e = order_key(_mm256_castps_si256(_mm256_load_ps(cols + e * kLanes)));
    const __m256i i_e = _mm256_set1_epi32(e);
    __m256i gt[K];
    for (int j = 0; j < K; ++j) gt[j] = _mm256_cmpgt_epi32(k_e, key[j]);
    for (int j = K - 1; j >= 1; --j) {
      const __m256i k_in = _mm256_blendv_epi8(k_e, key[j - 1], gt[j - 1]);
      const __m256i i_in = _mm256_blendv_epi8(i_e, idx[j - 1], gt[j - 1]);
      key[j] = _mm256_blendv_epi8(key[j], k_in, gt[j]);
      idx[j] = _mm256_blendv_epi8(idx[j], i_in, gt[j]);
    }
    key[0] = _mm256_blendv_epi8(key[0], k_e, gt[0]);
    idx[0] = _mm256_blendv_epi8(idx[0], i_e, gt[0]);
  }
  // The chosen logits; a row without a finite allowed logit counts as all-equal logits (0).
  __m256 top_v[K];
  for (int j = 0; j < K; ++j) top_v[j] = _mm256_castsi256_ps(order_key(key[j]));
  const __m256 degenerate = _mm256_cmp_ps(top_v[0], _mm256_set1_ps(-__builtin_inff()), _CMP_EQ_OQ);
  for (int j = 0; j < K; ++j) top_v[j] = _mm256_andnot_ps(degenerate, top_v[j]);

  alignas(32) float w_out[K][kLanes];
  int skip_bits[K] = {0};
  for (int h = 0; h < 2; ++h) {  // four tokens per float64 register
    const __m256d l0 = half_to_pd(top_v[0], h);
    __m256d z = _mm256_setzero_pd();
    if (!a.renormalize) {  // partition over the allowed experts relative to l_0, in order
      for (int32_t n = 0; n < plan.num_allowed; ++n) {
        const __m256 col = _mm256_load_ps(cols + plan.allowed[n] * kLanes);
        z = _mm256_add_pd(z, exp_nonpositive(_mm256_sub_pd(half_to_pd(col, h), l0)));
      }
      const __m128 deg_half = h == 0 ? _mm256_castps256_ps128(degenerate) : _mm256_extractf128_ps(degenerate, 1);
      const __m256d deg_mask = _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm_castps_si128(deg_half)));
      z = _mm256_blendv_pd(z, _mm256_set1_pd(static_cast<double>(plan.num_allowed)), deg_mask);
    }
    __m256d rel[K], skipped[K];
    rel[0] = _mm256_set1_pd(1.0);
    skipped[0] = _mm256_setzero_pd();
    __m256d topk_sum = _mm256_add_pd(_mm256_setzero_pd(), rel[0]);
    __m256d kept_sum = topk_sum;
    for (int j = 1; j < K; ++j) {
      const __m256d lj = half_to_pd(top_v[j], h);
      rel[j] = exp_nonpositive(_mm256_sub_pd(lj, l0));
      skipped[j] = a.skip_gap != nullptr
                       ? _mm256_cmp_pd(_mm256_sub_pd(l0, lj), _mm256_set1_pd(a.skip_gap[j]), _CMP_GT_OQ)
                       : _mm256_setzero_pd();
      topk_sum = _mm256_add_pd(topk_sum, rel[j]);
      kept_sum = _mm256_add_pd(kept_sum, _mm256_andnot_pd(skipped[j], rel[j]));
      skip_bits[j] |= _mm256_movemask_pd(skipped[j]) << (4 * h);
    }
    const __m256d scale = a.renormalize ? _mm256_div_pd(_mm256_set1_pd(1.0), kept_sum)
                                        : _mm256_div_pd(topk_sum, _mm256_mul_pd(kept_sum, z));
    for (int j = 0; j < K; ++j) {
      const __m128 w = _mm256_cvtpd_ps(_mm256_andnot_pd(skipped[j], _mm256_mul_pd(rel[j], scale)));
      _mm_store_ps(&w_out[j][4 * h], w);
    }
  }
  alignas(32) int32_t i_out[K][kLanes];
  for (int j = 0; j < K; ++j) _mm256_store_si256(reinterpret_cast<__m256i*>(i_out[j]), idx[j]);
  for (int lane = 0; lane < valid; ++lane) {
    for (int j = 0; j < K; ++j) {
      weights[lane * K + j] = w_out[j][lane];
      ids[lane * K + j] = ((skip_bits[j] >> lane) & 1) != 0 ? E : i_out[j][lane];
    }
  }
}

template <int K, typename scalar_t>
void route_rows_k(const scalar_t* logits, const Plan& plan, int64_t t_begin, int64_t t_end, float* weights,
                  int32_t* ids) {
  const int32_t E = plan.args->num_experts;
  alignas(32) float cols[kMaxExperts * kLanes];
  int64_t t = t_begin;
  for (; t + kLanes <= t_end; t += kLanes) {
    route_block<K>(logits + t * E, plan, cols, kLanes, weights + t * K, ids + t * K);
  }
  if (t < t_end) {  // the last rows, padded with copies of the last one
    alignas(32) scalar_t pad[kLanes * kMaxExperts];
    const int valid = static_cast<int>(t_end - t);
    for (int i = 0; i < kLanes; ++i) {
      const scalar_t* src = logits + (t + (i < valid ? i : valid - 1)) * E;
      for (int32_t e = 0; e < E; ++e) pad[i * E + e] = src[e];
    }
    route_block<K>(pad, plan, cols, valid, weights + t * K, ids + t * K);
  }
}

template <typename scalar_t>
void route_rows_typed(const scalar_t* logits, const Plan& plan, int64_t t_begin, int64_t t_end, float* weights,
                      int32_t* ids) {
  MOE_FAST_DISPATCH_TOP_K(plan.args->top_k, return, return route_rows_k<K>(logits, plan, t_begin, t_end, weights, ids))
}

}  // namespace

bool avx2_route_compiled() { return true; }

bool route_rows_avx2(DType dtype, const void* logits, const RouteArgs& args, int64_t t_begin, int64_t t_end,
                     float* weights, int32_t* ids) {
  if (args.num_experts < 1 || args.num_experts > kMaxExperts || args.top_k < 1 || args.top_k > kMaxTopK) {
    return false;
  }
  int32_t allowed[kMaxExperts];
  int32_t n = 0;
  for (int32_t e = 0; e < args.num_experts; ++e) {
    if (args.keep == nullptr || args.keep[e] != 0) allowed[n++] = e;
  }
  if (n < args.top_k) return false;  // the scalar code's id-E filling of missing slots
  if (t_end <= t_begin) return true;
  const Plan plan{&args, allowed, n};
  MOE_FAST_DISPATCH_DTYPE(dtype, return false,
                         route_rows_typed(static_cast<const scalar_t*>(logits), plan, t_begin, t_end, weights, ids);
                         return true)
  return false;
}

}  // namespace cpu
}  // namespace moe_fast

#else  // built without AVX2 flags (not x86, or another compiler): the scalar code runs

namespace moe_fast {
namespace cpu {

bool avx2_route_compiled() { return false; }

bool route_rows_avx2(DType, const void*, const RouteArgs&, int64_t, int64_t, float*, int32_t*) { return false; }

}  // namespace cpu
}  // namespace moe_fast

#endif
