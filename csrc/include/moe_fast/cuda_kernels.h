// moe_fast CUDA kernels: launcher declarations (namespace moe_fast::cuda).
//
// Plain CUDA C++ on raw device pointers; no torch header, so the kernels compile with nvcc alone
// (scripts/compile_cuda.sh) and other projects can call them without torch. Every launcher enqueues
// its work on `stream`, does not synchronize, and returns cudaGetLastError(). Semantics are those
// of the CPU kernels in kernels.h (specified by moe_fast/reference.py); workspaces are allocated by
// the caller (the torch binding uses the caching allocator).
#pragma once
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "moe_fast/kernels.h"

namespace moe_fast {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Op 1: routing and the dispatch plan.
// ---------------------------------------------------------------------------------------------

// Bytes of device workspace that route() needs for num_slots = T * k slots.
size_t route_workspace_bytes(int64_t num_slots, int32_t num_experts);

// logits [T, E] (device, element type `dtype`) -> weights [T, k] f32, ids [T, k] i32 (skipped: E),
// counts [E] i32, offsets [E + 1] i32, perm [T * k] i32 (all device).
// args.keep: device pointer [E] or nullptr. args.skip_gap: HOST pointer [k] or nullptr (its values
// travel as kernel parameters). The keep mask must allow at least k experts (the caller checks).
// workspace: route_workspace_bytes(T * k, E) bytes of device memory.
cudaError_t route(DType dtype, const void* logits, const RouteArgs& args, float* weights, int32_t* ids,
                  int32_t* counts, int32_t* offsets, int32_t* perm, void* workspace, size_t workspace_bytes,
                  cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Op 2a: per-token Gram entries (float32 accumulation), packed as in kernels.h.
// ---------------------------------------------------------------------------------------------

// outputs [T, M, H], target [T, H] or nullptr (device, element type `dtype`) -> gram [T, P],
// and with a target cross [T, M] and target_sq [T] (device, float32).
cudaError_t expert_gram(DType dtype, const void* outputs, const void* target, int64_t num_tokens, int64_t rank,
                        int64_t hidden, float* gram, float* cross, float* target_sq, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Op 2b: subset losses.
// Tokens are visited group by group in `order` (ascending token index inside a group), cut into
// chunks of at most kLossChunk tokens that never cross a group. One block sums the float64 errors
// of one chunk for a few candidates in a fixed-order tree; the chunks of a group are then added in
// order. No atomics: the result does not depend on scheduling.
// ---------------------------------------------------------------------------------------------

// A chunk: positions [begin, end) of `order`, all in one group.
struct LossChunk {
  int64_t begin;
  int64_t end;
};
static_assert(sizeof(LossChunk) == 2 * sizeof(int64_t), "LossChunk must be two packed int64");
static_assert(sizeof(ExpertMask) == kMaskWords * sizeof(uint64_t), "ExpertMask must be packed words");

// Host helper: from group starts start[G + 1] (positions in `order`), fills chunks and
// first_chunk[G + 1] (chunks of group g: [first_chunk[g], first_chunk[g + 1])). The same cut as the
// CPU binding.
inline void build_loss_chunks(const int64_t* start, int64_t num_groups, std::vector<LossChunk>& chunks,
                              std::vector<int64_t>& first_chunk) {
  chunks.clear();
  first_chunk.assign(num_groups + 1, 0);
  for (int64_t g = 0; g < num_groups; ++g) {
    first_chunk[g] = static_cast<int64_t>(chunks.size());
    for (int64_t i = start[g]; i < start[g + 1]; i += kLossChunk) {
      chunks.push_back({i, std::min(start[g + 1], i + kLossChunk)});
    }
  }
  first_chunk[num_groups] = static_cast<int64_t>(chunks.size());
}

// args: device pointers (gram, ids, logits, target_weights | cross + target_sq).
// masks [C] (device): candidate keep-sets. order [T] (device): tokens sorted by group.
// chunks [num_chunks], first_chunk [G + 1] (device) from build_loss_chunks.
// partial: device workspace of C * num_chunks doubles. out [C, G] float64 (device).
cudaError_t subset_loss(const SubsetLossArgs& args, const ExpertMask* masks, int64_t num_candidates,
                        const int64_t* order, const LossChunk* chunks, int64_t num_chunks,
                        const int64_t* first_chunk, int64_t num_groups, double* partial, double* out,
                        cudaStream_t stream);

}  // namespace cuda
}  // namespace moe_fast
