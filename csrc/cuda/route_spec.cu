// Op 1 on the GPU for any router (RouteSpecArgs): sigmoid scores with a selection bias and expert
// groups, softmax over the k chosen logits, a scaling factor. Plain softmax with scaling 1 is
// route.cu's; the bindings send every other descriptor here.
//
// One warp per token, straightforward rather than tuned: the lanes score the token's experts
// (lane + 32 i) into shared memory; lane g scores group g (its two best allowed biased scores)
// and then counts the groups ahead of it to know whether it is eligible; every lane builds the
// routing keys of its experts (rules.h: route_key: tier, value, index), and k rounds of a warp-wide
// maximum pick the slots in the CPU's order, so ids, counts, offsets and perm equal the CPU's
// wherever the float32 scores do (the sigmoid is CUDA's expf). Lane 0 computes the weights with
// the CPU's rules (sigmoid_slot_weights, route_slot_weights). The plan is route.cu's dispatch_plan.
#include <cfloat>
#include <cstdint>

#include "moe_fast/cuda_kernels.h"
#include "route_params.cuh"

namespace moe_fast {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kPerLane = kMaxExperts / kWarp;  // experts per lane at most

// route.cu's parameters (skip_gap: slot j >= 1 skipped when log w_0 - log w_j > skip_gap[j]), and:
struct RouteSpecParams : RouteParams {
  const float* bias;          // [E] or nullptr (sigmoid)
  Scoring scoring;
  bool grouped;               // groups can exclude experts (sigmoid, topk_group < n_group)
  int32_t n_group;
  int32_t topk_group;
  float scaling;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock)
    route_spec_kernel(const scalar_t* __restrict__ logits, RouteSpecParams p, float* __restrict__ weights,
                      int32_t* __restrict__ ids) {
  __shared__ float value_smem[kWarpsPerBlock][kMaxExperts];  // ranking value per expert (masked: -inf)
  __shared__ float group_smem[kWarpsPerBlock][kMaxExperts];  // group scores
  __shared__ bool eligible_smem[kWarpsPerBlock][kMaxExperts];  // per group
  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= p.num_tokens) return;  // the whole warp leaves together: the shuffles below stay full
  const int32_t E = p.num_experts;
  const int32_t k = p.top_k;
  const bool sigmoid = p.scoring == Scoring::Sigmoid;
  const scalar_t* row = logits + t * E;
  float* value = value_smem[warp];

  bool allowed[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int32_t e = lane + i * kWarp;
    allowed[i] = e < E && (p.keep == nullptr || p.keep[e] != 0);
    if (e < E) {
      float v = sanitize(to_float(row[e]));
      if (sigmoid) {
        v = sigmoid_score(v);
        if (p.bias != nullptr) v = v + p.bias[e];
      }
      value[e] = allowed[i] ? v : -INFINITY;
    }
  }
  __syncwarp();

  const int32_t size = E / p.n_group;
  if (p.grouped) {  // sigmoid only: an allowed expert's biased score is finite, a masked one -inf
    for (int32_t g = lane; g < p.n_group; g += kWarp) {
      float best = -INFINITY, second = -INFINITY;
      for (int32_t e = g * size; e < (g + 1) * size; ++e) {
        if (value[e] != -INFINITY) group_top2_push(value[e], best, second);
      }
      group_smem[warp][g] = group_score(best, second);
    }
    __syncwarp();
    for (int32_t g = lane; g < p.n_group; g += kWarp) {
      eligible_smem[warp][g] = group_is_eligible(group_smem[warp], p.n_group, g, p.topk_group);
    }
    __syncwarp();
  }

  uint64_t key[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int32_t e = lane + i * kWarp;
    key[i] = 0;
    if (e < E) {
      const int32_t tier = !allowed[i]                                  ? kTierMasked
                           : (p.grouped && !eligible_smem[warp][e / size]) ? kTierAllowed
                                                                          : kTierEligible;
      // Below the first tier experts rank as -inf (transformers' mask), i.e. by index.
      key[i] = route_key(tier, tier == kTierEligible ? value[e] : -INFINITY, e);
    }
  }
  uint64_t top[kMaxTopK];
#pragma unroll
  for (int j = 0; j < kMaxTopK; ++j) {
    top[j] = 0;
    if (j < k) {
      uint64_t best = 0;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) best = key[i] > best ? key[i] : best;
#pragma unroll
      for (int off = kWarp / 2; off > 0; off >>= 1) {
        const uint64_t other = __shfl_xor_sync(0xffffffffu, best, off);
        best = other > best ? other : best;
      }
      top[j] = best;  // keys are distinct: exactly one lane holds the winner
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        if (key[i] == best) key[i] = 0;
      }
    }
  }

  // Softmax partition over the allowed experts relative to l_0, for weights not renormalized.
  double z = 0.0;
  if (p.scoring == Scoring::Softmax && !p.renormalize) {
    const float l_0 = route_key_value(top[0]);
    const bool degenerate = l_0 == -INFINITY;  // taken as all-equal logits
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int32_t e = lane + i * kWarp;
      if (allowed[i]) z += degenerate ? 1.0 : exp(static_cast<double>(value[e]) - static_cast<double>(l_0));
    }
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) z += __shfl_xor_sync(0xffffffffu, z, off);
  }
  if (lane != 0) return;

  float top_v[kMaxTopK];
  int32_t top_i[kMaxTopK];
#pragma unroll
  for (int j = 0; j < kMaxTopK; ++j) {
    top_i[j] = j < k ? route_key_expert(top[j]) : 0;
    top_v[j] = 0.f;
    if (j < k) top_v[j] = sigmoid ? sigmoid_score(sanitize(to_float(row[top_i[j]]))) : value[top_i[j]];
  }
  float w[kMaxTopK];
  bool skipped[kMaxTopK];
  if (sigmoid) {
    sigmoid_slot_weights(top_v, k, p.has_skip, p.skip_gap, p.renormalize, w, skipped);
  } else {
    if (top_v[0] == -INFINITY) {  // no finite allowed logit: all-equal logits
#pragma unroll
      for (int j = 0; j < kMaxTopK; ++j) top_v[j] = 0.f;
    }
    // softmax_topk: the softmax of the k chosen logits, i.e. the renormalized slot weights.
    const bool renormalize = p.renormalize || p.scoring == Scoring::SoftmaxTopK;
    route_slot_weights(top_v, k, p.has_skip, p.skip_gap, renormalize, z, w, skipped);
  }
  float* w_out = weights + t * k;
  int32_t* i_out = ids + t * k;
#pragma unroll
  for (int j = 0; j < kMaxTopK; ++j) {
    if (j < k) {
      w_out[j] = w[j] * p.scaling;  // float32, as the reference scales
      i_out[j] = skipped[j] ? E : top_i[j];
    }
  }
}

template <typename scalar_t>
void launch_route_spec(const void* logits, const RouteSpecParams& p, float* weights, int32_t* ids,
                       cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((p.num_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock);
  route_spec_kernel<scalar_t><<<blocks, kWarp * kWarpsPerBlock, 0, stream>>>(static_cast<const scalar_t*>(logits),
                                                                             p, weights, ids);
}

}  // namespace

cudaError_t route_spec(DType dtype, const void* logits, const RouteSpecArgs& args, float* weights, int32_t* ids,
                       int32_t* counts, int32_t* offsets, int32_t* perm, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream) {
  if (validate_route_spec(args) != nullptr) return cudaErrorInvalidValue;  // validate_route_spec names it
  const RouteArgs& a = args.route;
  const int64_t T = a.num_tokens;
  const int32_t E = a.num_experts;
  const int64_t n = T * a.top_k;  // <= INT32_MAX after validate_route
  if (workspace_bytes < route_workspace_bytes(n, E)) return cudaErrorInvalidValue;
  if (T > 0) {
    RouteSpecParams p{};
    static_cast<RouteParams&>(p) = route_params(a);
    p.bias = args.selection_bias;
    p.scoring = args.scoring;
    p.grouped = route_spec_grouped(args);
    p.n_group = args.n_group;
    p.topk_group = args.topk_group;
    p.scaling = args.scaling;
    MOE_FAST_DISPATCH_DTYPE(dtype, return cudaErrorInvalidValue,
                            launch_route_spec<scalar_t>(logits, p, weights, ids, stream))
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return dispatch_plan(ids, n, E, counts, offsets, perm, workspace, workspace_bytes, stream);
}

}  // namespace cuda
}  // namespace moe_fast
