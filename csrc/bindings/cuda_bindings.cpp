// CUDA implementations of the moe_fast ops: checks, allocation and streams around csrc/cuda/.
// Compiled only when torch has CUDA (setup.py adds this file with -DMOE_FAST_WITH_CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "checks.h"
#include "moe_fast/cuda_kernels.h"

namespace moe_fast {
namespace {

// Plain softmax routers (scaling 1) take route.cu's kernel unchanged; every other descriptor the
// general one (route_spec.cu). Both end in the same dispatch plan. No host synchronization.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_cuda(
    const at::Tensor& logits, int64_t k, bool renormalize, std::optional<at::ArrayRef<double>> beta,
    const std::optional<at::Tensor>& keep, c10::string_view scoring, const std::optional<at::Tensor>& selection_bias,
    int64_t n_group, int64_t topk_group, double scaling) {
  const std::vector<double> gaps = check_route_args(logits, k, beta, keep);
  const c10::cuda::CUDAGuard guard(logits.device());
  const RouteSpecInputs spec{scoring, selection_bias, n_group, topk_group, scaling};
  check_route_spec(logits, k, spec);                    // a GPU bias is checked finite on the device
  if (keep.has_value()) check_keep_leaves_k(*keep, k);  // on the device: no synchronization
  auto [weights, ids, counts, offsets, perm] = alloc_route_outputs(logits, k);
  const RouteArgs a = route_args(logits, k, renormalize, gaps, keep);
  const size_t ws_bytes = cuda::route_workspace_bytes(a.num_tokens * k, a.num_experts);
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, logits.options().dtype(at::kByte));
  const DType dtype = dtype_of(logits, "logits");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (is_plain_softmax(spec)) {
    C10_CUDA_CHECK(cuda::route(dtype, logits.data_ptr(), a, weights.data_ptr<float>(), ids.data_ptr<int32_t>(),
                               counts.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(), perm.data_ptr<int32_t>(),
                               workspace.data_ptr(), ws_bytes, stream));
  } else {
    const RouteSpecArgs sa = route_spec_args(a, spec);
    const Error err = validate_route_spec(sa);  // the checks above give the readable messages
    TORCH_CHECK(err == nullptr, "moe_fast.", err);
    C10_CUDA_CHECK(cuda::route_spec(dtype, logits.data_ptr(), sa, weights.data_ptr<float>(), ids.data_ptr<int32_t>(),
                                    counts.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(), perm.data_ptr<int32_t>(),
                                    workspace.data_ptr(), ws_bytes, stream));
  }
  return {weights, ids, counts, offsets, perm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> expert_gram_cuda(const at::Tensor& outputs,
                                                                const std::optional<at::Tensor>& target) {
  const GramShapes s = check_gram_args(outputs, target);
  const c10::cuda::CUDAGuard guard(outputs.device());
  auto [gram, cross, target_sq] = alloc_gram_outputs(outputs, target.has_value());
  const bool has = target.has_value();
  C10_CUDA_CHECK(cuda::expert_gram(dtype_of(outputs, "outputs"), outputs.data_ptr(), has ? target->data_ptr() : nullptr,
                                   s.T, s.M, s.H, gram.data_ptr<float>(), has ? cross.data_ptr<float>() : nullptr,
                                   has ? target_sq.data_ptr<float>() : nullptr, c10::cuda::getCurrentCUDAStream()));
  return {gram, cross, target_sq};
}

// Host synchronizations per call: none when keep and group are on the CPU (as the search passes
// them); one more for each of keep and group given on the GPU (they are needed on the host to
// cut the work). ids, logits and a layer-wise target are checked on the device (_assert_async).
at::Tensor subset_loss_cuda(const at::Tensor& gram, const at::Tensor& ids, const at::Tensor& logits,
                            const at::Tensor& keep, const at::Tensor& group, int64_t num_groups, int64_t k,
                            bool renormalize, const std::optional<at::Tensor>& target_weights,
                            const std::optional<at::Tensor>& cross, const std::optional<at::Tensor>& target_sq,
                            c10::string_view scoring, const std::optional<at::Tensor>& selection_bias, int64_t n_group,
                            int64_t topk_group, double scaling) {
  const RouteSpecInputs spec{scoring, selection_bias, n_group, topk_group, scaling};
  const SubsetLossArgs a = check_subset_loss_args(gram, ids, logits, keep, group, num_groups, k, renormalize,
                                                  target_weights, cross, target_sq, spec);
  const c10::cuda::CUDAGuard guard(gram.device());
  const int64_t T = a.num_tokens, C = keep.size(0), G = num_groups, M = a.rank, E = a.num_experts;
  const at::Tensor keep_cpu = keep.is_cpu() ? keep : keep.cpu();  // sync only for a GPU keep
  check_candidate_sizes(keep_cpu, M, k);
  check_target_is_routing(target_weights, k);
  at::Tensor out = at::zeros({C, G}, gram.options().dtype(at::kDouble));
  if (T == 0 || C == 0) return out;
  check_ids_ranked(ids, ranking_values(logits, spec), a.scoring == Scoring::Sigmoid);

  // Tokens sorted by group (ascending inside a group) and each group's first position.
  std::vector<int64_t> start;
  std::vector<int64_t> host_order;  // filled when group is on the host
  at::Tensor order;                 // device int64 [T] when group is on the GPU
  if (group.is_cpu()) {
    host_group_plan(group, G, start, host_order);
  } else {
    const auto sorted = at::sort(group, /*stable=*/std::optional<bool>(true), /*dim=*/0, /*descending=*/false);
    order = std::get<1>(sorted).contiguous();
    const at::Tensor dev_start = at::searchsorted(std::get<0>(sorted), at::arange(G + 1, group.options()));
    const at::Tensor start_cpu = dev_start.cpu();  // the one sync for a GPU group
    const int64_t* sp = start_cpu.data_ptr<int64_t>();
    TORCH_CHECK(sp[0] == 0 && sp[G] == T, "moe_fast.subset_loss: group ids must lie in [0, num_groups = ", G,
                "), found ", sp[0] != 0 ? "a negative id" : "an id >= num_groups");
    start.assign(sp, sp + G + 1);
  }

  // One pinned host table -> one asynchronous copy: chunks [n, 2], first_chunk [G + 1],
  // candidate masks [C, kMaskWords], then (host group) order [T].
  std::vector<cuda::LossChunk> chunks;
  std::vector<int64_t> first_chunk;
  cuda::build_loss_chunks(start.data(), G, chunks, first_chunk);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  const int64_t mask_at = 2 * n_chunks + (G + 1), order_at = mask_at + C * kMaskWords;
  at::Tensor table = at::empty({order_at + static_cast<int64_t>(host_order.size())},
                               at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* tp = table.data_ptr<int64_t>();
  for (int64_t i = 0; i < n_chunks; ++i) {
    tp[2 * i] = chunks[i].begin;
    tp[2 * i + 1] = chunks[i].end;
  }
  std::copy(first_chunk.begin(), first_chunk.end(), tp + 2 * n_chunks);
  const uint8_t* kp = reinterpret_cast<const uint8_t*>(keep_cpu.data_ptr<bool>());
  for (int64_t c = 0; c < C; ++c) {
    const ExpertMask mask = cpu::pack_mask(kp + c * E, a.num_experts);
    for (int32_t w = 0; w < kMaskWords; ++w) tp[mask_at + c * kMaskWords + w] = static_cast<int64_t>(mask.words[w]);
  }
  std::copy(host_order.begin(), host_order.end(), tp + order_at);
  // Pinned source, non-blocking: the caching host allocator keeps the buffer until the copy ran.
  const at::Tensor dev_table = table.to(gram.device(), at::kLong, /*non_blocking=*/true);
  const int64_t* dp = dev_table.data_ptr<int64_t>();
  const int64_t* order_ptr = group.is_cpu() ? dp + order_at : order.data_ptr<int64_t>();
  at::Tensor partial = at::empty({C * n_chunks}, gram.options().dtype(at::kDouble));

  C10_CUDA_CHECK(cuda::subset_loss(a, reinterpret_cast<const ExpertMask*>(dp + mask_at), C, order_ptr,
                                   reinterpret_cast<const cuda::LossChunk*>(dp), n_chunks, dp + 2 * n_chunks, G,
                                   partial.data_ptr<double>(), out.data_ptr<double>(),
                                   c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace
}  // namespace moe_fast

TORCH_LIBRARY_IMPL(moe_fast, CUDA, m) {
  m.impl("route", &moe_fast::route_cuda);
  m.impl("expert_gram", &moe_fast::expert_gram_cuda);
  m.impl("subset_loss", &moe_fast::subset_loss_cuda);
}
