// Input checks and conversions shared by the CPU and CUDA bindings.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <optional>
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
  TORCH_CHECK(logits.size(0) * k < std::numeric_limits<int32_t>::max(),
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
    TORCH_CHECK(b.size() == 1 || static_cast<int64_t>(b.size()) == k - 1,
                "moe_fast.route: beta must hold one value or k - 1 = ", k - 1, " values (slots 1..k-1), got ",
                b.size());
    gaps.assign(k, std::numeric_limits<double>::infinity());
    for (int64_t j = 1; j < k; ++j) {
      const double v = b.size() == 1 ? b[0] : b[j - 1];
      TORCH_CHECK(v >= 0.0 && v <= 1.0, "moe_fast.route: beta must lie in [0, 1], got ", v);
      gaps[j] = v == 0.0 ? std::numeric_limits<double>::infinity() : -std::log(v);
    }
    if (b.size() == 1) TORCH_CHECK(b[0] >= 0.0 && b[0] <= 1.0, "moe_fast.route: beta must lie in [0, 1], got ", b[0]);
  }
  return gaps;
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
                                             const std::optional<at::Tensor>& target_sq) {
  const auto dev = gram.device();
  check_tensor(gram, "gram", 2, dev);
  check_tensor(ids, "ids", 2, dev);
  check_tensor(logits, "logits", 2, dev);
  check_tensor(keep, "keep", 2, dev);
  check_tensor(group, "group", 1, dev);
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
  SubsetLossArgs a;
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
// token is bounded by that). Checked with tensor ops so it runs on any device.
inline void check_target_is_routing(const std::optional<at::Tensor>& target_weights, int64_t k) {
  if (!target_weights.has_value() || target_weights->numel() == 0) return;
  const int64_t most = target_weights->ne(0).sum(1).max().item<int64_t>();
  TORCH_CHECK(most <= k, "moe_fast.subset_loss: target_weights must have at most k = ", k,
              " nonzero weights per token (a routing), found a token with ", most);
}

// Every candidate must keep at least k experts and drop at most M - k (the rank bound), so that
// each token's top-k among the kept lies within its M ranked experts.
inline void check_candidate_sizes(const at::Tensor& keep_cpu, int64_t M, int64_t k) {
  const int64_t C = keep_cpu.size(0), E = keep_cpu.size(1);
  const bool* p = keep_cpu.data_ptr<bool>();
  for (int64_t c = 0; c < C; ++c) {
    int64_t kept = 0;
    for (int64_t e = 0; e < E; ++e) kept += p[c * E + e] ? 1 : 0;
    TORCH_CHECK(kept >= k, "moe_fast.subset_loss: candidate ", c, " keeps ", kept, " experts, fewer than k = ", k);
    TORCH_CHECK(E - kept <= M - k, "moe_fast.subset_loss: candidate ", c, " drops ", E - kept,
                " experts but ids rank only M = ", M, " per token (at most M - k = ", M - k,
                " may be dropped); compute ids and gram with M >= k + dropped");
  }
}

}  // namespace moe_fast
