// The rules that the CPU kernels, the CUDA kernels and the torch bindings share, each in one
// place: limits, logit sanitizing, the Gram packing, expert bit masks, what a ranked ids row is,
// the skip threshold and route's slot weights, the experts a candidate keeps among a token's
// ranked ones, what a candidate keep-set may drop, and the general router's rules (sigmoid
// scores, group scores and eligibility, routing keys, the skip test on log-weights). Plain C++ callable from host and device
// code (MOE_FAST_HD); no torch header. moe_fast/kernels/reference.py states the same rules in PyTorch;
// docs/ARCHITECTURE.md says where each layer sits.
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "moe_fast/dtype.h"

// Unrolls the next loop in device code (small fixed-size arrays then stay in registers); the
// host compilers unroll on their own (and in nvcc's host pass would warn about the pragma).
#if defined(__CUDA_ARCH__)
#define MOE_FAST_UNROLL _Pragma("unroll")
#else
#define MOE_FAST_UNROLL
#endif

namespace moe_fast {

constexpr int32_t kMaxTopK = 8;
constexpr int32_t kMaxExperts = 512;
constexpr int32_t kMaskWords = kMaxExperts / 64;  // 64-bit words in one expert bit mask

// A logit as the kernels read it: NaN never wins (-inf); +inf is the largest finite float, so
// that a softmax stays defined.
MOE_FAST_HD float sanitize(float v) {
  if (v != v) return -INFINITY;
  if (v == INFINITY) return FLT_MAX;
  return v;
}

// Gram packing: for M outputs per token, the upper triangle row by row, P = M * (M + 1) / 2
// entries; entry (i, j) (either order) of token t is gram[t * P + gram_index(i, j, M)].
MOE_FAST_HD int64_t gram_index(int64_t i, int64_t j, int64_t m) {
  if (i > j) {
    const int64_t s = i;
    i = j;
    j = s;
  }
  return i * m - i * (i - 1) / 2 + (j - i);
}

// Bit mask of kept experts: bit e of word e / 64 (experts 0 .. kMaxExperts - 1 only).
struct ExpertMask {
  uint64_t words[kMaskWords];
};

MOE_FAST_HD bool mask_has(const ExpertMask& mask, int32_t e) { return (mask.words[e >> 6] >> (e & 63)) & 1u; }

// Routing order: expert a (logit la) ranks before expert b when its sanitized logit is larger, or
// equal with a lower index. Strict, so a repeated expert is never "before" itself.
MOE_FAST_HD bool ranks_before(float la, int32_t a, float lb, int32_t b) {
  const float sa = sanitize(la), sb = sanitize(lb);
  return sa > sb || (sa == sb && a < b);
}

// A row of subset_loss's ids: the row's top m experts in routing order, exactly as
// route(logits, m).ids gives them: in [0, E), each ranked strictly before the next (so no expert
// twice), and no expert outside the row ranked before its last. O(E).
MOE_FAST_HD bool ranked_row_ok(const int32_t* ids, const float* logits_row, int32_t m, int32_t num_experts) {
  for (int32_t i = 0; i < m; ++i) {
    if (ids[i] < 0 || ids[i] >= num_experts) return false;
    if (i > 0 && !ranks_before(logits_row[ids[i - 1]], ids[i - 1], logits_row[ids[i]], ids[i])) return false;
  }
  const int32_t last = ids[m - 1];
  const float l_last = sanitize(logits_row[last]);
  int32_t before_last = 0;  // must be ids[0 .. m-2] and nothing else (ranks_before, unrolled)
  for (int32_t e = 0; e < num_experts; ++e) {
    const float l = sanitize(logits_row[e]);
    before_last += static_cast<int32_t>((l > l_last) | ((l == l_last) & (e < last)));
  }
  return before_last == m - 1;
}

// Skip threshold: slot j >= 1 is skipped when l_0 - l_j > -log(beta_j), i.e. w_j < beta_j * w_0.
// beta holds one value for every slot or k - 1 values (slots 1..k-1), each in [0, 1]; beta = 0
// never skips. Fills gaps[0..k) (gaps[0] = +inf, unused). Returns nullptr, or a static message
// naming what is wrong (gaps untouched).
inline const char* skip_gaps_from_beta(const double* beta, int64_t count, int32_t k, double* gaps) {
  if (count != 1 && count != k - 1) return "beta must hold one value or k - 1 values (slots 1..k-1)";
  for (int64_t i = 0; i < count; ++i) {
    if (!(beta[i] >= 0.0 && beta[i] <= 1.0)) return "beta must lie in [0, 1]";
  }
  gaps[0] = INFINITY;
  for (int32_t j = 1; j < k; ++j) {
    const double b = count == 1 ? beta[0] : beta[j - 1];
    gaps[j] = b == 0.0 ? static_cast<double>(INFINITY) : -std::log(b);
  }
  return nullptr;
}

// The skip test of one slot, in float64 so that a gap of -log(beta) is met exactly as the CPU
// and the GPU both compute it: l_0 is the top slot's logit, l_j the slot's, gap = skip_gaps[j].
MOE_FAST_HD bool skips_slot(float l_0, float l_j, double gap) {
  return static_cast<double>(l_0) - static_cast<double>(l_j) > gap;
}

// Route's weights of one token's slots 0..k-1 (k <= N), on every device. top_v: the chosen
// experts' sanitized logits, largest first (all 0 for a row without a finite allowed logit).
// skip_gap [k], read only when has_skip. z: the sum over the allowed experts of exp(l_e - l_0),
// read only when !renormalize. Writes w[0..k) (0 for a skipped slot) and skipped[0..k). The
// sums run in slot order in float64, so CPU and GPU differ only by their exp(). (Fixed-size
// arrays and a separate has_skip let nvcc keep everything in registers and parameter space.)
template <int N>
MOE_FAST_HD void route_slot_weights(const float (&top_v)[N], int32_t k, bool has_skip, const double* skip_gap,
                                    bool renormalize, double z, float* w, bool (&skipped)[N]) {
  double rel[N];  // exp(l_j - l_0)
  double kept_sum = 0.0, topk_sum = 0.0;
  MOE_FAST_UNROLL
  for (int j = 0; j < N; ++j) {
    rel[j] = 0.0;
    skipped[j] = false;
    if (j < k) {
      rel[j] = j == 0 ? 1.0 : exp(static_cast<double>(top_v[j]) - static_cast<double>(top_v[0]));
      skipped[j] = j > 0 && has_skip && skips_slot(top_v[0], top_v[j], skip_gap[j]);
      topk_sum += rel[j];
      if (!skipped[j]) kept_sum += rel[j];
    }
  }
  const double scale = renormalize ? 1.0 / kept_sum : topk_sum / (kept_sum * z);
  MOE_FAST_UNROLL
  for (int j = 0; j < N; ++j) {
    if (j < k) w[j] = skipped[j] ? 0.f : static_cast<float>(rel[j] * scale);
  }
}

// The experts a candidate (mask) keeps among a token's M ranked ones: the first k of them, as
// positions slot[0..n) into the ids row (ascending). Returns n (k when the candidate keeps k of
// the row, as subset_loss's callers guarantee).
MOE_FAST_HD int32_t kept_ranked_slots(const ExpertMask& mask, const int32_t* ids, int32_t m, int32_t k,
                                      int32_t* slot) {
  int32_t n = 0;
  for (int32_t i = 0; i < m && n < k; ++i) {
    if (mask_has(mask, ids[i])) slot[n++] = i;
  }
  return n;
}

// How many of values[0..n) are nonzero: experts a keep mask allows, weights a target sets.
template <typename T>
inline int64_t count_nonzero(const T* values, int64_t n) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += values[i] != T(0) ? 1 : 0;
  return count;
}

// A subset_loss candidate that keeps `kept` of E experts fits ids ranked M deep when it keeps at
// least k and drops at most M - k: then each token's top k among the kept lie within its M
// ranked experts (the Gram entries cover them).
inline bool candidate_keeps_k(int64_t kept, int64_t k) { return kept >= k; }
inline bool candidate_drops_within_rank(int64_t kept, int64_t num_experts, int64_t m, int64_t k) {
  return num_experts - kept <= m - k;
}

// ---------------------------------------------------------------------------------------------
// Routing descriptors (docs/ROUTING.md; semantics: route_spec in moe_fast/kernels/reference.py): the
// rules of the general route kernels (csrc/cpu/route_spec.cpp, csrc/cuda/route_spec.cu).
// ---------------------------------------------------------------------------------------------

// How a router scores experts. The values match nothing in Python on purpose: bindings map names.
enum class Scoring : int32_t { Softmax = 0, Sigmoid = 1, SoftmaxTopK = 2 };

// An expert's sigmoid score from its sanitized logit, in float32 exactly as torch's scalar
// sigmoid computes it (1 / (1 + exp(-l))): -inf scores 0, the largest float 1.
MOE_FAST_HD float sigmoid_score(float l) { return 1.0f / (1.0f + expf(-l)); }

// A group's score from its two best allowed biased scores (best >= second; -INFINITY = none):
// their float32 sum, the best alone when the group allows one expert, -inf when it allows none.
MOE_FAST_HD float group_score(float best, float second) { return best + (second == -INFINITY ? 0.0f : second); }

// Adds an allowed biased score to a group's running best two (ties count twice).
MOE_FAST_HD void group_top2_push(float c, float& best, float& second) {
  if (c > best) {
    second = best;
    best = c;
  } else if (c > second) {
    second = c;
  }
}

// Whether group g is among the topk_group best of scores[0..G): fewer than topk_group groups
// score higher, or equal with a lower index (ties to the lower group). O(G).
MOE_FAST_HD bool group_is_eligible(const float* scores, int32_t num_groups, int32_t g, int32_t topk_group) {
  int32_t ahead = 0;
  const float sg = scores[g];
  for (int32_t h = 0; h < num_groups; ++h) ahead += static_cast<int32_t>((scores[h] > sg) | ((scores[h] == sg) & (h < g)));
  return ahead < topk_group;
}

// Routing tiers: allowed experts of eligible groups first (by ranking value), then the other
// allowed ones, then masked ones (both by index: their value counts as -inf). Without groups
// every allowed expert is in tier 0. The second tier fills slots only when the eligible groups
// hold fewer than k experts, as transformers' router does (it masks them with -inf).
constexpr int32_t kTierEligible = 0, kTierAllowed = 1, kTierMasked = 2;

// A 64-bit key that orders experts as the general route does: lower tier first, then the larger
// ranking value (sanitized logit, or biased sigmoid score; -0 equals +0), then the lower index.
// Larger key = routed first; never 0 (0 can mark "no candidate"). v must not be NaN.
MOE_FAST_HD uint64_t route_key(int32_t tier, float v, int32_t e) {
  v = v + 0.0f;  // -0 -> +0
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(v);
#else
  std::memcpy(&u, &v, sizeof(u));
#endif
  u ^= (u >> 31) != 0u ? 0xFFFFFFFFu : 0x80000000u;  // monotone in v
  return (static_cast<uint64_t>(kTierMasked - tier) << 48) | (static_cast<uint64_t>(u) << 16) |
         static_cast<uint64_t>(0xFFFF - e);
}

MOE_FAST_HD int32_t route_key_expert(uint64_t key) { return 0xFFFF - static_cast<int32_t>(key & 0xFFFFu); }

MOE_FAST_HD float route_key_value(uint64_t key) {
  uint32_t u = static_cast<uint32_t>(key >> 16);
  u ^= (u >> 31) != 0u ? 0x80000000u : 0xFFFFFFFFu;
  return bits_to_float(u);
}

// The skip test on any router's final weights: slot j >= 1 is skipped when
// log w_0 - log w_j > gap_j (= -log beta_j), in float64. For softmax scorings the log-weights are
// the logits (skips_slot); for sigmoid the logs of the float32 scores.
MOE_FAST_HD bool skips_by_log_ratio(double log_w0, double log_wj, double gap) { return log_w0 - log_wj > gap; }

// Sigmoid router's weights of one token's slots 0..k-1 (k <= N): s = the chosen experts' float32
// scores in routing order. Skipped slots weigh 0; the survivors are divided by their sum + 1e-20
// (renormalize, as transformers does) or scaled to keep the k scores' sum. float64 inside; the
// caller multiplies by the router's scaling.
template <int N>
MOE_FAST_HD void sigmoid_slot_weights(const float (&s)[N], int32_t k, bool has_skip, const double* skip_gap,
                                      bool renormalize, float* w, bool (&skipped)[N]) {
  double kept_sum = 0.0, topk_sum = 0.0;
  bool any_skipped = false;
  const double log_w0 = log(static_cast<double>(s[0]));
  MOE_FAST_UNROLL
  for (int j = 0; j < N; ++j) {
    skipped[j] = false;
    if (j < k) {
      skipped[j] = j > 0 && has_skip && skips_by_log_ratio(log_w0, log(static_cast<double>(s[j])), skip_gap[j]);
      any_skipped = any_skipped || skipped[j];
      topk_sum += s[j];
      if (!skipped[j]) kept_sum += s[j];
    }
  }
  const double scale = renormalize ? 1.0 / (kept_sum + 1e-20) : any_skipped ? topk_sum / kept_sum : 1.0;
  MOE_FAST_UNROLL
  for (int j = 0; j < N; ++j) {
    if (j < k) w[j] = skipped[j] ? 0.f : static_cast<float>(static_cast<double>(s[j]) * scale);
  }
}

// ---------------------------------------------------------------------------------------------
// subset_loss for a routing descriptor without groups (csrc/cpu/subset_loss.cpp,
// csrc/cuda/subset_loss.cu; semantics: subset_weights_spec in moe_fast/kernels/reference.py). A candidate
// routes a token to the first k kept experts of its ranked row; only the weights depend on the
// scoring.
// ---------------------------------------------------------------------------------------------

// What an expert is ranked by: its sanitized logit (softmax scorings), or its biased float32
// sigmoid score (bias: [E] or nullptr). Either is a valid ranked_row_ok row (never NaN).
MOE_FAST_HD float ranking_value(Scoring scoring, float logit, const float* bias, int32_t e) {
  const float l = sanitize(logit);
  if (scoring != Scoring::Sigmoid) return l;
  const float s = sigmoid_score(l);
  return bias != nullptr ? s + bias[e] : s;
}

// Whether the softmax weights are divided by the chosen experts' sum: softmax_topk's softmax over
// the k chosen logits is exactly that.
MOE_FAST_HD bool softmax_over_chosen(Scoring scoring, bool renormalize) {
  return renormalize || scoring == Scoring::SoftmaxTopK;
}

// Sigmoid candidate weights in place: w[0..n) hold the chosen experts' float32 scores; with
// renormalize they are divided by their float64 sum + 1e-20 (as transformers does).
MOE_FAST_HD void sigmoid_subset_weights(double* w, int32_t n, bool renormalize) {
  if (!renormalize) return;
  double sum = 0.0;
  for (int32_t j = 0; j < n; ++j) sum += w[j];
  const double denom = sum + 1e-20;
  for (int32_t j = 0; j < n; ++j) w[j] /= denom;
}

}  // namespace moe_fast
