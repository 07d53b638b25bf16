// Op 1 on the CPU for any router (RouteSpecArgs): sigmoid scores with a selection bias and expert
// groups, softmax over the k chosen logits, a scaling factor. Scalar and plain on purpose: one
// pass over a token's experts builds the routing keys (rules.h: route_key), a second over the
// groups marks the eligible ones, and a fixed-size insertion keeps the k best keys. Plain
// softmax with scaling 1 never comes here (route.cpp serves it); softmax with a scaling does.
#include <cmath>
#include <vector>

#include "moe_fast/kernels.h"

namespace moe_fast {
namespace cpu {
namespace {

// One token's routing inputs over its E experts.
struct TokenScores {
  float value[kMaxExperts];  // ranking value: sanitized logit (softmax scorings), biased score (sigmoid)
  float score[kMaxExperts];  // sigmoid only: the unbiased float32 score (the weight)
  int32_t tier[kMaxExperts];
  int32_t allowed = 0;
};

template <typename scalar_t>
void score_token(const scalar_t* row, const RouteSpecArgs& a, TokenScores& ts) {
  const int32_t E = a.route.num_experts;
  const bool sigmoid = a.scoring == Scoring::Sigmoid;
  ts.allowed = 0;
  for (int32_t e = 0; e < E; ++e) {
    const bool allowed = a.route.keep == nullptr || a.route.keep[e] != 0;
    const float l = sanitize(to_float(row[e]));
    float v = l;
    if (sigmoid) {
      ts.score[e] = sigmoid_score(l);
      v = a.selection_bias != nullptr ? ts.score[e] + a.selection_bias[e] : ts.score[e];
    }
    ts.value[e] = allowed ? v : -INFINITY;
    ts.tier[e] = allowed ? kTierEligible : kTierMasked;
    ts.allowed += allowed ? 1 : 0;
  }
}

// Moves the allowed experts of groups outside the topk_group best into the second tier, where
// they rank as -inf (transformers' mask) by index alone: they fill slots only when the eligible
// groups hold fewer than k experts.
void mark_groups(const RouteSpecArgs& a, TokenScores& ts) {
  const int32_t G = a.n_group, size = a.route.num_experts / a.n_group;
  float group[kMaxExperts];
  for (int32_t g = 0; g < G; ++g) {
    float best = -INFINITY, second = -INFINITY;
    for (int32_t e = g * size; e < (g + 1) * size; ++e) {
      if (ts.tier[e] != kTierMasked) group_top2_push(ts.value[e], best, second);
    }
    group[g] = group_score(best, second);
  }
  for (int32_t g = 0; g < G; ++g) {
    if (group_is_eligible(group, G, g, a.topk_group)) continue;
    for (int32_t e = g * size; e < (g + 1) * size; ++e) {
      if (ts.tier[e] != kTierMasked) {
        ts.tier[e] = kTierAllowed;
        ts.value[e] = -INFINITY;
      }
    }
  }
}

// The K largest routing keys, largest first: an insertion as max/min exchanges, skipped for the
// (after the first few, most) keys below the K-th best so far.
template <int K>
void top_keys(const TokenScores& ts, int32_t num_experts, uint64_t (&top)[K]) {
  for (int j = 0; j < K; ++j) top[j] = 0;
  for (int32_t e = 0; e < num_experts; ++e) {
    uint64_t key = route_key(ts.tier[e], ts.value[e], e);
    if (key <= top[K - 1]) continue;
    for (int j = 0; j < K; ++j) {
      const uint64_t hi = key > top[j] ? key : top[j];
      key = key > top[j] ? top[j] : key;
      top[j] = hi;
    }
  }
}

// Sum over allowed experts of exp(l_e - l_0): the softmax partition of weights that are not
// renormalized (as route.cpp computes it).
double partition_sum(const TokenScores& ts, int32_t num_experts, float l_0) {
  double z = 0.0;
  for (int32_t e = 0; e < num_experts; ++e) {
    if (ts.tier[e] != kTierMasked) z += std::exp(static_cast<double>(ts.value[e]) - l_0);
  }
  return z;
}

template <int K, typename scalar_t>
void route_spec_rows_k(const scalar_t* logits, const RouteSpecArgs& a, int64_t t_begin, int64_t t_end,
                       float* weights, int32_t* ids) {
  const int32_t E = a.route.num_experts;
  const bool has_skip = a.route.skip_gap != nullptr;
  TokenScores ts;
  for (int64_t t = t_begin; t < t_end; ++t) {
    score_token(logits + t * E, a, ts);
    if (route_spec_grouped(a)) mark_groups(a, ts);
    uint64_t top[K];
    top_keys<K>(ts, E, top);
    int32_t top_i[K];
    float top_v[K];
    for (int j = 0; j < K; ++j) {
      top_i[j] = route_key_expert(top[j]);
      top_v[j] = a.scoring == Scoring::Sigmoid ? ts.score[top_i[j]] : ts.value[top_i[j]];
    }
    float* w = weights + t * K;
    bool skipped[K];
    if (a.scoring == Scoring::Sigmoid) {
      sigmoid_slot_weights(top_v, K, has_skip, a.route.skip_gap, a.route.renormalize, w, skipped);
    } else {
      // A row with no finite allowed logit is taken as all-equal logits (as route.cpp).
      const bool degenerate = top_v[0] == -INFINITY;
      if (degenerate) {
        for (int j = 0; j < K; ++j) top_v[j] = 0.f;
      }
      // softmax_topk: the softmax of the k chosen logits, i.e. the renormalized slot weights.
      const bool renormalize = a.route.renormalize || a.scoring == Scoring::SoftmaxTopK;
      const double z = renormalize ? 0.0 : degenerate ? static_cast<double>(ts.allowed) : partition_sum(ts, E, top_v[0]);
      route_slot_weights(top_v, K, has_skip, a.route.skip_gap, renormalize, z, w, skipped);
    }
    if (a.scaling != 1.0f) {
      for (int j = 0; j < K; ++j) w[j] *= a.scaling;  // float32, as the reference scales
    }
    int32_t* i_out = ids + t * K;
    for (int j = 0; j < K; ++j) i_out[j] = skipped[j] ? E : top_i[j];
  }
}

template <typename scalar_t>
void route_spec_rows_typed(const scalar_t* logits, const RouteSpecArgs& a, int64_t t_begin, int64_t t_end,
                           float* weights, int32_t* ids) {
  MOE_FAST_DISPATCH_TOP_K(a.route.top_k, return, return route_spec_rows_k<K>(logits, a, t_begin, t_end, weights, ids))
}

}  // namespace

void route_spec_rows(DType dtype, const void* logits, const RouteSpecArgs& args, int64_t t_begin, int64_t t_end,
                     float* weights, int32_t* ids) {
  MOE_FAST_DISPATCH_DTYPE(
      dtype, return,
      return route_spec_rows_typed(static_cast<const scalar_t*>(logits), args, t_begin, t_end, weights, ids))
}

Error route_spec(DType dtype, const void* logits, const RouteSpecArgs& args, float* weights, int32_t* ids,
                 int32_t* counts, int32_t* offsets, int32_t* perm) {
  if (const Error err = validate_route_spec(args)) return err;
  const int32_t E = args.route.num_experts, k = args.route.top_k;
  const int64_t T = args.route.num_tokens;
  if (args.route.keep != nullptr && count_nonzero(args.route.keep, E) < k) return "route: keep allows fewer than k experts";
  if (args.selection_bias != nullptr) {
    for (int32_t e = 0; e < E; ++e) {
      if (!std::isfinite(args.selection_bias[e])) return "route: selection_bias must be finite";
    }
  }
  route_spec_rows(dtype, logits, args, 0, T, weights, ids);
  // The dispatch plan, as cpu::route builds it (one range: the cursors are the bucket starts).
  std::vector<int32_t> cursor(E + 1, 0);
  plan_histogram(ids, 0, T, k, E, cursor.data());
  int32_t running = 0;
  for (int32_t b = 0; b <= E; ++b) {
    const int32_t n = cursor[b];
    offsets[b] = running;
    if (b < E) counts[b] = n;
    cursor[b] = running;
    running += n;
  }
  plan_scatter(ids, 0, T, k, E, cursor.data(), perm);
  return nullptr;
}

}  // namespace cpu
}  // namespace moe_fast
