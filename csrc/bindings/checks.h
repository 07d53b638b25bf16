// Input checks and conversions shared by the CPU and CUDA bindings.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "moe_fast/kernels.h"

namespace moe_fast {

inline DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::Float32;
    case at::kBFloat16:
      return DType::BFloat16;
    case at::kHalf:
      return DType::Float16;
    default:
      TORCH_CHECK(false, "moe_fast: ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

inline void check_tensor(const at::Tensor& t, const char* name, int64_t dim, at::Device device) {
  TORCH_CHECK(t.dim() == dim, "moe_fast: ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
  TORCH_CHECK(t.device() == device, "moe_fast: ", name, " must be on ", device, " like the other inputs, got ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), "moe_fast: ", name, " must be contiguous (call .contiguous())");
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, "moe_fast: ", name, " must be ", want, ", got ", t.scalar_type());
}

// Validates the route op's arguments; returns the per-slot skip gaps -log(beta) ([k], or empty).
inline std::vector<double> check_route_args(const at::Tensor& logits, int64_t k,
                                            const std::optional<at::ArrayRef<double>>& beta,
                                            const std::optional<at::Tensor>& keep) {
  TORCH_CHECK(logits.dim() == 2, "moe_fast.route: logits must be [T, E], got shape ", logits.sizes());
  check_tensor(logits, "logits", 2, logits.device());
  dtype_of(logits, "logits");
  const int64_t E = logits.size(1);
  TORCH_CHECK(E >= 1 && E <= kMaxExperts, "moe_fast.route: number of experts E must be in 1..", kMaxExperts,
              ", got ", E);
  TORCH_CHECK(k >= 1 && k <= kMaxTopK, "moe_fast.route: k must be in 1..", kMaxTopK, ", got ", k);
  TORCH_CHECK(k <= E, "moe_fast.route: k (", k, ") must not exceed the number of experts (", E, ")");
  TORCH_CHECK(logits.size(0) <= std::numeric_limits<int32_t>::max() / k,
              "moe_fast.route: T * k must fit in int32, got T = ", logits.size(0));
  if (keep.has_value()) {
    check_tensor(*keep, "keep", 1, logits.device());
    check_dtype(*keep, "keep", at::kBool);
    TORCH_CHECK(keep->size(0) == E, "moe_fast.route: keep must have one entry per expert (", E, "), got ",
                keep->size(0));
  }
  std::vector<double> gaps;
  if (beta.has_value()) {
    const auto& b = *beta;
    gaps.resize(k);
    const char* err = skip_gaps_from_beta(b.data(), static_cast<int64_t>(b.size()), static_cast<int32_t>(k), gaps.data());
    TORCH_CHECK(err == nullptr, "moe_fast.route: ", err, " (k = ", k, "), got ", b);
  }
  return gaps;
}

// The keep mask must allow at least k experts. A mask on the CPU is counted on the host; one on
// a GPU is checked on the device (no synchronization: a violation raises at the next one).
inline void check_keep_leaves_k(const at::Tensor& keep, int64_t k) {
  if (keep.is_cpu()) {
    const int64_t allowed = count_nonzero(keep.data_ptr<bool>(), keep.numel());
    TORCH_CHECK(allowed >= k, "moe_fast.route: keep allows ", allowed, " experts, fewer than k = ", k);
  } else {
    at::_assert_async(keep.sum().ge(k), "moe_fast.route: keep allows fewer than k experts");
  }
}

// The kernels' view of the route op's (checked) arguments: logits [T, E], gaps [k] or empty,
// keep [E] bool. Holds pointers into gaps and keep, which must outlive it.
inline RouteArgs route_args(const at::Tensor& logits, int64_t k, bool renormalize, const std::vector<double>& gaps,
                            const std::optional<at::Tensor>& keep) {
  RouteArgs a;
  a.num_tokens = logits.size(0);
  a.num_experts = static_cast<int32_t>(logits.size(1));
  a.top_k = static_cast<int32_t>(k);
  a.renormalize = renormalize;
  a.skip_gap = gaps.empty() ? nullptr : gaps.data();  // host memory (CUDA: passed by value to the kernel)
  a.keep = keep.has_value() ? reinterpret_cast<const uint8_t*>(keep->data_ptr<bool>()) : nullptr;
  return a;
}

// The route op's routing descriptor (docs/ROUTING.md) as its schema passes it.
struct RouteSpecInputs {
  c10::string_view scoring;
  const std::optional<at::Tensor>& selection_bias;
  int64_t n_group;
  int64_t topk_group;
  double scaling;
};

inline Scoring scoring_of(c10::string_view name, const char* op = "moe_fast.route") {
  if (name == "softmax") return Scoring::Softmax;
  if (name == "sigmoid") return Scoring::Sigmoid;
  if (name == "softmax_topk") return Scoring::SoftmaxTopK;
  TORCH_CHECK(false, op, ": scoring must be 'softmax', 'sigmoid' or 'softmax_topk', got '", name, "'");
}

// The router the plain kernels serve (route.cpp, route.cu): softmax over all experts, scaling 1.
inline bool is_plain_softmax(const RouteSpecInputs& spec) {
  return scoring_of(spec.scoring) == Scoring::Softmax && spec.scaling == 1.0;
}

// Validates the descriptor against logits [T, E] and k (check_route_args ran first); `op` names
// the op in the messages. A bias on the CPU is checked finite on the host; on a GPU on the device
// (no synchronization).
inline void check_route_spec(const at::Tensor& logits, int64_t k, const RouteSpecInputs& spec,
                             const char* op = "moe_fast.route") {
  const Scoring scoring = scoring_of(spec.scoring, op);
  const int64_t E = logits.size(1);
  const int64_t G = spec.n_group, topk_group = spec.topk_group;
  TORCH_CHECK(std::isfinite(spec.scaling) && spec.scaling > 0.0,
              op, ": scaling must be a finite number > 0, got ", spec.scaling);
  TORCH_CHECK(G >= 1 && topk_group >= 1 && topk_group <= G,
              op, ": need n_group >= 1 and 1 <= topk_group <= n_group, got n_group = ", G,
              ", topk_group = ", topk_group);
  if (scoring != Scoring::Sigmoid) {
    TORCH_CHECK(!spec.selection_bias.has_value() && topk_group == G, op, ": a selection_bias and expert ",
                "groups (topk_group < n_group) need scoring 'sigmoid', got scoring '", spec.scoring, "'");
    return;
  }
  TORCH_CHECK(E % G == 0, op, ": n_group (", G, ") must divide the number of experts E (", E, ")");
  if (!spec.selection_bias.has_value()) return;
  const at::Tensor& bias = *spec.selection_bias;
  check_tensor(bias, "selection_bias", 1, logits.device());
  check_dtype(bias, "selection_bias", at::kFloat);
  TORCH_CHECK(bias.size(0) == E, op, ": selection_bias must be [E] = [", E, "], got ", bias.sizes());
  if (bias.is_cpu()) {
    const float* b = bias.data_ptr<float>();
    for (int64_t e = 0; e < E; ++e) {
      TORCH_CHECK(std::isfinite(b[e]), op, ": selection_bias must be finite, got ", b[e], " at expert ", e);
    }
  } else {
    at::_assert_async(at::isfinite(bias).all(), std::string(op) + ": selection_bias must be finite");
  }
}

// The kernels' view of a checked descriptor on top of route_args; holds a pointer into the bias.
inline RouteSpecArgs route_spec_args(const RouteArgs& base, const RouteSpecInputs& spec) {
  RouteSpecArgs a;
  a.route = base;
  a.scoring = scoring_of(spec.scoring);
  a.selection_bias = spec.selection_bias.has_value() ? spec.selection_bias->data_ptr<float>() : nullptr;
  a.n_group = static_cast<int32_t>(spec.n_group);
  a.topk_group = static_cast<int32_t>(spec.topk_group);
  a.scaling = static_cast<float>(spec.scaling);
  return a;
}

// Allocates the route op's outputs: weights, ids, counts, offsets, perm.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> alloc_route_outputs(
    const at::Tensor& logits, int64_t k) {
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto i32 = logits.options().dtype(at::kInt);
  return {at::empty({T, k}, logits.options().dtype(at::kFloat)), at::empty({T, k}, i32), at::zeros({E}, i32),
          at::zeros({E + 1}, i32), at::empty({T * k}, i32)};
}

struct GramShapes {
  int64_t T, M, H;
};

inline GramShapes check_gram_args(const at::Tensor& outputs, const std::optional<at::Tensor>& target) {
  check_tensor(outputs, "outputs", 3, outputs.device());
  dtype_of(outputs, "outputs");
  const int64_t T = outputs.size(0), M = outputs.size(1), H = outputs.size(2);
  TORCH_CHECK(M >= 1 && M <= kMaxExperts, "moe_fast.expert_gram: outputs must be [T, M, H] with M in 1..",
              kMaxExperts, ", got shape ", outputs.sizes());
  if (target.has_value()) {
    check_tensor(*target, "target", 2, outputs.device());
    check_dtype(*target, "target", outputs.scalar_type());
    TORCH_CHECK(target->size(0) == T && target->size(1) == H, "moe_fast.expert_gram: target must be [T, H] = [",
                T, ", ", H, "], got ", target->sizes());
  }
  return {T, M, H};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> alloc_gram_outputs(const at::Tensor& outputs, bool has_target) {
  const int64_t T = outputs.size(0), M = outputs.size(1);
  const auto f32 = outputs.options().dtype(at::kFloat);
  return {at::empty({T, M * (M + 1) / 2}, f32), at::empty({T, has_target ? M : 0}, f32),
          at::empty({has_target ? T : 0}, f32)};
}

// Validates subset_loss's arguments and returns the kernel view of them (pointers filled).
inline SubsetLossArgs check_subset_loss_args(const at::Tensor& gram, const at::Tensor& ids,
                                             const at::Tensor& logits, const at::Tensor& keep,
                                             const at::Tensor& group, int64_t num_groups, int64_t k,
                                             bool renormalize, const std::optional<at::Tensor>& target_weights,
                                             const std::optional<at::Tensor>& cross,
                                             const std::optional<at::Tensor>& target_sq,
                                             const RouteSpecInputs& spec) {
  const auto dev = gram.device();
  check_tensor(gram, "gram", 2, dev);
  check_tensor(ids, "ids", 2, dev);
  check_tensor(logits, "logits", 2, dev);
  // keep and group may stay on the host when the rest is on a GPU (they are read there anyway).
  check_tensor(keep, "keep", 2, keep.is_cpu() ? keep.device() : dev);
  check_tensor(group, "group", 1, group.is_cpu() ? group.device() : dev);
  check_dtype(gram, "gram", at::kFloat);
  check_dtype(ids, "ids", at::kInt);
  check_dtype(logits, "logits", at::kFloat);
  check_dtype(keep, "keep", at::kBool);
  check_dtype(group, "group", at::kLong);
  const int64_t T = gram.size(0), M = ids.size(1), E = logits.size(1);
  TORCH_CHECK(E >= 1 && E <= kMaxExperts, "moe_fast.subset_loss: number of experts E must be in 1..", kMaxExperts,
              ", got ", E);
  TORCH_CHECK(k >= 1 && k <= kMaxTopK, "moe_fast.subset_loss: k must be in 1..", kMaxTopK, ", got ", k);
  TORCH_CHECK(M >= k && M <= E, "moe_fast.subset_loss: ids must be [T, M] with k <= M <= E, got M = ", M,
              " (k = ", k, ", E = ", E, ")");
  TORCH_CHECK(ids.size(0) == T && logits.size(0) == T && group.size(0) == T,
              "moe_fast.subset_loss: gram, ids, logits and group must share T = ", T, " tokens, got ", ids.size(0),
              ", ", logits.size(0), ", ", group.size(0));
  TORCH_CHECK(gram.size(1) == M * (M + 1) / 2, "moe_fast.subset_loss: gram must be [T, M(M+1)/2] = [T, ",
              M * (M + 1) / 2, "] for M = ", M, ", got ", gram.sizes());
  TORCH_CHECK(keep.size(1) == E, "moe_fast.subset_loss: keep must be [C, E] with E = ", E, ", got ", keep.sizes());
  TORCH_CHECK(num_groups >= 1 || T == 0, "moe_fast.subset_loss: num_groups must be >= 1, got ", num_groups);
  TORCH_CHECK(num_groups >= 0, "moe_fast.subset_loss: num_groups must be >= 0, got ", num_groups);
  const bool layerwise = target_weights.has_value();
  TORCH_CHECK(layerwise != (cross.has_value() || target_sq.has_value()),
              "moe_fast.subset_loss: give either target_weights (layer-wise) or cross and target_sq (progressive)");
  TORCH_CHECK(layerwise || (cross.has_value() && target_sq.has_value()),
              "moe_fast.subset_loss: progressive mode needs both cross and target_sq");
  TORCH_CHECK(scoring_of(spec.scoring, "moe_fast.subset_loss") != Scoring::Sigmoid || spec.topk_group >= spec.n_group,
              "moe_fast.subset_loss: grouped routing (n_group = ", spec.n_group, ", topk_group = ", spec.topk_group,
              ") is not supported yet: a candidate's experts then depend on group scores over the experts it keeps, ",
              "not only on a prefix of each token's ranked list");
  check_route_spec(logits, k, spec, "moe_fast.subset_loss");
  SubsetLossArgs a;
  a.scoring = scoring_of(spec.scoring, "moe_fast.subset_loss");
  a.selection_bias = spec.selection_bias.has_value() ? spec.selection_bias->data_ptr<float>() : nullptr;
  a.scaling = spec.scaling;
  a.num_tokens = T;
  a.num_experts = static_cast<int32_t>(E);
  a.rank = static_cast<int32_t>(M);
  a.top_k = static_cast<int32_t>(k);
  a.renormalize = renormalize;
  a.gram = gram.data_ptr<float>();
  a.ids = ids.data_ptr<int32_t>();
  a.logits = logits.data_ptr<float>();
  if (layerwise) {
    check_tensor(*target_weights, "target_weights", 2, dev);
    check_dtype(*target_weights, "target_weights", at::kFloat);
    TORCH_CHECK(target_weights->size(0) == T && target_weights->size(1) == M,
                "moe_fast.subset_loss: target_weights must be [T, M] = [", T, ", ", M, "], got ",
                target_weights->sizes());
    a.target_weights = target_weights->data_ptr<float>();
  } else {
    check_tensor(*cross, "cross", 2, dev);
    check_tensor(*target_sq, "target_sq", 1, dev);
    check_dtype(*cross, "cross", at::kFloat);
    check_dtype(*target_sq, "target_sq", at::kFloat);
    TORCH_CHECK(cross->size(0) == T && cross->size(1) == M, "moe_fast.subset_loss: cross must be [T, M] = [", T,
                ", ", M, "], got ", cross->sizes());
    TORCH_CHECK(target_sq->size(0) == T, "moe_fast.subset_loss: target_sq must be [T] = [", T, "], got ",
                target_sq->sizes());
    a.cross = cross->data_ptr<float>();
    a.target_sq = target_sq->data_ptr<float>();
  }
  return a;
}

// A layer-wise target is a routing: at most k nonzero weights per token (the kernels' work per
// token is bounded by that). On the CPU with the token's position; on a GPU on the device.
inline void check_target_is_routing(const std::optional<at::Tensor>& target_weights, int64_t k) {
  if (!target_weights.has_value() || target_weights->numel() == 0) return;
  const at::Tensor& tw = *target_weights;
  if (tw.is_cpu()) {
    const int64_t T = tw.size(0), M = tw.size(1);
    const float* p = tw.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t) {
      const int64_t nonzero = count_nonzero(p + t * M, M);
      TORCH_CHECK(nonzero <= k, "moe_fast.subset_loss: target_weights must have at most k = ", k,
                  " nonzero weights per token (a routing), found ", nonzero, " at token ", t);
    }
  } else {
    at::_assert_async(tw.ne(0).sum(1).le(k).all(),
                      "moe_fast.subset_loss: target_weights must have at most k nonzero weights per token");
  }
}

// What subset_loss's ids rows are ranked by (ranking_value in rules.h): the logits, or for sigmoid
// the biased scores sigmoid(sanitized logits) + bias, computed with the same torch ops as
// reference.rank_spec so that ids from it always pass. [T, E] float32 on the logits' device.
inline at::Tensor ranking_values(const at::Tensor& logits, const RouteSpecInputs& spec) {
  if (scoring_of(spec.scoring, "moe_fast.subset_loss") != Scoring::Sigmoid) return logits;
  const double inf = std::numeric_limits<double>::infinity();
  at::Tensor scores = at::sigmoid(at::nan_to_num(logits, -inf, std::numeric_limits<float>::max(), -inf));
  if (spec.selection_bias.has_value()) scores = scores + *spec.selection_bias;
  return scores.contiguous();
}

// ids rows: in [0, E), each expert once, in the router's order (ranked_row_ok in rules.h) by
// `values` (ranking_values). On the CPU with the token's position; on a GPU the same rule in
// tensor ops, checked on the device.
inline void check_ids_ranked(const at::Tensor& ids, const at::Tensor& values, bool by_score) {
  const at::Tensor& logits = values;
  const int64_t T = ids.size(0), M = ids.size(1), E = logits.size(1);
  if (T == 0) return;
  if (ids.is_cpu()) {
    const int32_t* ip = ids.data_ptr<int32_t>();
    const float* lp = logits.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t) {
      const int32_t* row = ip + t * M;
      for (int64_t i = 0; i < M; ++i) {
        TORCH_CHECK(row[i] >= 0 && row[i] < E, "moe_fast.subset_loss: ids must lie in [0, E = ", E, "), found ",
                    row[i], " at token ", t, " (a skipped slot cannot be ranked)");
      }
      TORCH_CHECK(ranked_row_ok(row, lp + t * E, static_cast<int32_t>(M), static_cast<int32_t>(E)),
                  "moe_fast.subset_loss: ids row of token ", t, " is not ranked: each expert once, ",
                  by_score ? "largest biased sigmoid score first, ties to the lower index (as "
                             "reference.rank_spec(logits, spec)[:, :M] gives them); got "
                           : "largest logit first, ties to the lower index (as route(logits, M).ids gives them); got ",
                  c10::ArrayRef<int32_t>(row, static_cast<size_t>(M)));
    }
    return;
  }
  const at::Tensor in_range = ids.ge(0).logical_and(ids.lt(E)).all();
  at::_assert_async(in_range, "moe_fast.subset_loss: ids must lie in [0, E) (a skipped slot cannot be ranked)");
  const at::Tensor idx = ids.clamp(0, E - 1).to(at::kLong);
  const at::Tensor all = at::nan_to_num(logits, -std::numeric_limits<double>::infinity(),
                                        std::numeric_limits<float>::max(), -std::numeric_limits<double>::infinity());
  const at::Tensor lg = all.gather(1, idx);
  const at::Tensor l_last = lg.narrow(1, M - 1, 1), i_last = idx.narrow(1, M - 1, 1);
  const at::Tensor experts = at::arange(E, idx.options()).unsqueeze(0);
  const at::Tensor ahead = all.gt(l_last).logical_or(all.eq(l_last).logical_and(experts.lt(i_last)));
  at::_assert_async(ahead.sum(1).eq(M - 1).all(),
                    "moe_fast.subset_loss: an ids row is not its row's top M experts (route(logits, M).ids)");
  if (M < 2) return;
  const at::Tensor a = lg.narrow(1, 0, M - 1), b = lg.narrow(1, 1, M - 1);
  const at::Tensor before = a.gt(b).logical_or(a.eq(b).logical_and(idx.narrow(1, 0, M - 1).lt(idx.narrow(1, 1, M - 1))));
  at::_assert_async(before.all(), "moe_fast.subset_loss: an ids row is not ranked (each expert once, in route's order)");
}

// Tokens of each group and their chunks, from a host group tensor; checks the group ids.
inline void host_group_plan(const at::Tensor& group_cpu, int64_t num_groups, std::vector<int64_t>& start,
                            std::vector<int64_t>& order) {
  const int64_t T = group_cpu.size(0);
  const int64_t* gp = group_cpu.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(gp[t] >= 0 && gp[t] < num_groups, "moe_fast.subset_loss: group ids must lie in [0, num_groups = ",
                num_groups, "), found ", gp[t], " at token ", t);
  }
  group_order(gp, T, num_groups, start, order);
}

// Every candidate must keep at least k experts and drop at most M - k (the rank bound), so that
// each token's top-k among the kept lies within its M ranked experts.
inline void check_candidate_sizes(const at::Tensor& keep_cpu, int64_t M, int64_t k) {
  const int64_t C = keep_cpu.size(0), E = keep_cpu.size(1);
  const bool* p = keep_cpu.data_ptr<bool>();
  for (int64_t c = 0; c < C; ++c) {
    const int64_t kept = count_nonzero(p + c * E, E);
    TORCH_CHECK(candidate_keeps_k(kept, k), "moe_fast.subset_loss: candidate ", c, " keeps ", kept,
                " experts, fewer than k = ", k);
    TORCH_CHECK(candidate_drops_within_rank(kept, E, M, k), "moe_fast.subset_loss: candidate ", c, " drops ",
                E - kept, " experts but ids rank only M = ", M, " per token (at most M - k = ", M - k,
                " may be dropped); compute ids and gram with M >= k + dropped");
  }
}

}  // namespace moe_fast
