// moe_fast CUDA kernels: launcher declarations (namespace moe_fast::cuda).
//
// Plain CUDA C++ on raw device pointers; no torch header, so the kernels compile with nvcc alone
// (scripts/compile_cuda.sh) and other projects can call them without torch. Every launcher enqueues
// its work on `stream`, does not synchronize, and returns cudaGetLastError(); arguments outside the
// limits of kernels.h's validate_* give cudaErrorInvalidValue before anything is launched (call
// the validate_* function for the message). Conditions on device data (ids ranked, group ids in
// range, candidate sizes) cannot be read without a synchronization: the caller guarantees them
// (the torch binding checks them on the device). Semantics are those
// of the CPU kernels in kernels.h (specified by moe_fast/kernels/reference.py); workspaces are allocated by
// the caller (the torch binding uses the caching allocator).
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

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
// travel as kernel parameters). The keep mask must allow at least k experts (the caller checks;
// otherwise the missing slots get id E, never an out-of-range id).
// workspace: route_workspace_bytes(T * k, E) bytes of device memory.
cudaError_t route(DType dtype, const void* logits, const RouteArgs& args, float* weights, int32_t* ids,
                  int32_t* counts, int32_t* offsets, int32_t* perm, void* workspace, size_t workspace_bytes,
                  cudaStream_t stream);

// The dispatch plan of ids [T * k] = num_slots (device, values 0..E, E = skipped): counts [E],
// offsets [E + 1], perm [num_slots] (device), as route() writes them. workspace:
// route_workspace_bytes(num_slots, E) bytes. Shared by route() and route_spec().
cudaError_t dispatch_plan(const int32_t* ids, int64_t num_slots, int32_t num_experts, int32_t* counts,
                          int32_t* offsets, int32_t* perm, void* workspace, size_t workspace_bytes,
                          cudaStream_t stream);

// route() for any router (RouteSpecArgs in kernels.h; route_spec.cu): same outputs and workspace.
// args.route.skip_gap: HOST pointer [k] or nullptr; args.route.keep and args.selection_bias:
// device pointers [E] or nullptr (the caller guarantees a finite bias and at least k allowed).
cudaError_t route_spec(DType dtype, const void* logits, const RouteSpecArgs& args, float* weights, int32_t* ids,
                       int32_t* counts, int32_t* offsets, int32_t* perm, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Op 2a: per-token Gram entries (float32 accumulation), packed as in kernels.h.
// ---------------------------------------------------------------------------------------------

// outputs [T, M, H], target [T, H] (device, element type `dtype`) -> gram [T, P], and in target
// mode (cross given) cross [T, M] and target_sq [T] (device, float32); target may be nullptr in
// target mode only when H == 0 (then cross and target_sq are zeros).
cudaError_t expert_gram(DType dtype, const void* outputs, const void* target, int64_t num_tokens, int64_t rank,
                        int64_t hidden, float* gram, float* cross, float* target_sq, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Op 2b: subset losses.
// Tokens are visited group by group in `order` (ascending token index inside a group), cut into
// chunks of at most kLossChunk tokens that never cross a group. One block sums the float64 errors
// of one chunk for a few candidates in a fixed-order tree; the chunks of a group are then added in
// order. No atomics: the result does not depend on scheduling.
// ---------------------------------------------------------------------------------------------

using moe_fast::build_loss_chunks;  // kernels.h: the same cut as the CPU
using moe_fast::LossChunk;
static_assert(sizeof(LossChunk) == 2 * sizeof(int64_t), "LossChunk must be two packed int64");
static_assert(sizeof(ExpertMask) == kMaskWords * sizeof(uint64_t), "ExpertMask must be packed words");

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
