// CPU implementations of the moe_fast ops: checks, allocation and threading around csrc/cpu/.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"

namespace moe_fast {
namespace {

constexpr int64_t kRouteGrain = 1024;  // tokens per task: routing one token is ~E operations
constexpr int64_t kRouteSpecGrain = 64;  // tokens per task for the general router: ~E sigmoids each
constexpr int64_t kPlanChunk = 16384;  // tokens per histogram/scatter chunk
constexpr int64_t kGramGrain = 16;     // tokens per task: one token is M^2 / 2 dot products of H

// ids [T, k] -> counts [E], offsets [E + 1], perm [T * k], the same for any number of threads.
void build_plan(const int32_t* ids, int64_t T, int32_t k, int32_t E, int32_t* counts, int32_t* offsets,
                int32_t* perm) {
  const int64_t nchunks = std::max<int64_t>(1, (T + kPlanChunk - 1) / kPlanChunk);
  std::vector<int32_t> cursor(nchunks * (E + 1), 0);
  at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      cpu::plan_histogram(ids, c * kPlanChunk, std::min(T, (c + 1) * kPlanChunk), k, E, &cursor[c * (E + 1)]);
    }
  });
  int32_t running = 0;
  for (int32_t bucket = 0; bucket <= E; ++bucket) {
    offsets[bucket] = running;  // offsets[E]: where the skipped slots start
    for (int64_t c = 0; c < nchunks; ++c) {
      const int32_t n = cursor[c * (E + 1) + bucket];
      cursor[c * (E + 1) + bucket] = running;
      running += n;
    }
    if (bucket < E) counts[bucket] = running - offsets[bucket];
  }
  at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      cpu::plan_scatter(ids, c * kPlanChunk, std::min(T, (c + 1) * kPlanChunk), k, E, &cursor[c * (E + 1)], perm);
    }
  });
}

// Plain softmax routers (scaling 1) take route.cpp's kernel unchanged; every other descriptor
// the general one (route_spec.cpp). Both share the dispatch plan.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_cpu(
    const at::Tensor& logits, int64_t k, bool renormalize, std::optional<at::ArrayRef<double>> beta,
    const std::optional<at::Tensor>& keep, c10::string_view scoring, const std::optional<at::Tensor>& selection_bias,
    int64_t n_group, int64_t topk_group, double scaling) {
  const std::vector<double> gaps = check_route_args(logits, k, beta, keep);
  const RouteSpecInputs spec{scoring, selection_bias, n_group, topk_group, scaling};
  check_route_spec(logits, k, spec);
  if (keep.has_value()) check_keep_leaves_k(*keep, k);
  auto [weights, ids, counts, offsets, perm] = alloc_route_outputs(logits, k);
  const RouteArgs a = route_args(logits, k, renormalize, gaps, keep);
  const int64_t T = a.num_tokens;
  const int32_t E = a.num_experts;
  const DType dtype = dtype_of(logits, "logits");
  const void* src = logits.data_ptr();
  float* w = weights.data_ptr<float>();
  int32_t* id = ids.data_ptr<int32_t>();
  if (is_plain_softmax(spec)) {
    at::parallel_for(0, T, kRouteGrain, [&](int64_t b, int64_t e) { cpu::route_rows(dtype, src, a, b, e, w, id); });
  } else {
    const RouteSpecArgs sa = route_spec_args(a, spec);
    const Error err = validate_route_spec(sa);  // the checks above give the readable messages
    TORCH_CHECK(err == nullptr, "moe_fast.", err);
    at::parallel_for(0, T, kRouteSpecGrain,
                     [&](int64_t b, int64_t e) { cpu::route_spec_rows(dtype, src, sa, b, e, w, id); });
  }
  build_plan(id, T, a.top_k, E, counts.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(), perm.data_ptr<int32_t>());
  return {weights, ids, counts, offsets, perm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> expert_gram_cpu(const at::Tensor& outputs,
                                                               const std::optional<at::Tensor>& target) {
  const GramShapes s = check_gram_args(outputs, target);
  auto [gram, cross, target_sq] = alloc_gram_outputs(outputs, target.has_value());
  const DType dtype = dtype_of(outputs, "outputs");
  const void* y = outputs.data_ptr();
  const void* z = target.has_value() ? target->data_ptr() : nullptr;
  float* g = gram.data_ptr<float>();
  float* c = target.has_value() ? cross.data_ptr<float>() : nullptr;
  float* zz = target.has_value() ? target_sq.data_ptr<float>() : nullptr;
  at::parallel_for(0, s.T, kGramGrain, [&](int64_t b, int64_t e) {
    cpu::expert_gram_rows(dtype, y, z, s.M, s.H, b, e, g, c, zz);
  });
  return {gram, cross, target_sq};
}

at::Tensor subset_loss_cpu(const at::Tensor& gram, const at::Tensor& ids, const at::Tensor& logits,
                           const at::Tensor& keep, const at::Tensor& group, int64_t num_groups, int64_t k,
                           bool renormalize, const std::optional<at::Tensor>& target_weights,
                           const std::optional<at::Tensor>& cross, const std::optional<at::Tensor>& target_sq,
                           c10::string_view scoring, const std::optional<at::Tensor>& selection_bias, int64_t n_group,
                           int64_t topk_group, double scaling) {
  const RouteSpecInputs spec{scoring, selection_bias, n_group, topk_group, scaling};
  const SubsetLossArgs a = check_subset_loss_args(gram, ids, logits, keep, group, num_groups, k, renormalize,
                                                  target_weights, cross, target_sq, spec);
  const int64_t C = keep.size(0), G = num_groups, M = a.rank, E = a.num_experts;
  check_candidate_sizes(keep, M, k);
  check_target_is_routing(target_weights, k);
  check_ids_ranked(ids, ranking_values(logits, spec), a.scoring == Scoring::Sigmoid);
  // Tokens bucketed by group, ascending inside each group; then fixed chunks of kLossChunk.
  std::vector<int64_t> start, order;
  host_group_plan(group, G, start, order);
  std::vector<LossChunk> chunks;
  std::vector<int64_t> first_chunk;
  build_loss_chunks(start.data(), G, chunks, first_chunk);
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  std::vector<ExpertMask> masks(C);
  const uint8_t* kp = reinterpret_cast<const uint8_t*>(keep.data_ptr<bool>());
  for (int64_t c = 0; c < C; ++c) masks[c] = cpu::pack_mask(kp + c * E, a.num_experts);
  // Work items: (block of candidates, token chunk). Each (candidate, chunk) sum is computed in
  // token order by one thread, so the result does not depend on the thread count.
  constexpr int64_t kCandidateBlock = 16;
  const int64_t nblocks = (C + kCandidateBlock - 1) / kCandidateBlock;
  std::vector<double> partial(C * nchunks, 0.0);  // [chunk, C]
  at::parallel_for(0, nblocks * nchunks, 1, [&](int64_t b, int64_t e) {
    std::vector<double> sums(kCandidateBlock);
    for (int64_t item = b; item < e; ++item) {
      const int64_t c0 = (item / nchunks) * kCandidateBlock;
      const int64_t nc = std::min(kCandidateBlock, C - c0);
      const int64_t chunk = item % nchunks;
      const LossChunk& ch = chunks[chunk];
      cpu::subset_loss_tokens(a, masks.data() + c0, nc, order.data() + ch.begin, ch.end - ch.begin, sums.data());
      for (int64_t c = 0; c < nc; ++c) partial[chunk * C + c0 + c] = sums[c];
    }
  });
  at::Tensor out = at::zeros({C, G}, gram.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t g = 0; g < G; ++g) {
      double total = 0.0;
      for (int64_t i = first_chunk[g]; i < first_chunk[g + 1]; ++i) total += partial[i * C + c];
      o[c * G + g] = total;
    }
  }
  return out;
}

}  // namespace
}  // namespace moe_fast

TORCH_LIBRARY_IMPL(moe_fast, CPU, m) {
  m.impl("route", &moe_fast::route_cpu);
  m.impl("expert_gram", &moe_fast::expert_gram_cpu);
  m.impl("subset_loss", &moe_fast::subset_loss_cpu);
}
