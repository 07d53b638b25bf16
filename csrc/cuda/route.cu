// Op 1 on the GPU: fused routing with threshold skipping, and the dispatch plan.
//
// Routing: a group of G lanes (8, 16 or 32; G <= one warp) per token, each lane holding up to VPT
// experts e = lane + i * G. Top-k is k rounds of a group-wide argmax ordered by (logit desc, index
// asc), so ties go to the lower index exactly as on the CPU: ids, counts, offsets and perm are
// the CPU's bit for bit. The weights use the CPU's float64 formula (route_slot_weights in
// rules.h) on one lane, but are not promised bit-identical: exp() is CUDA's, and with
// renormalize=False the partition sum is added per lane and then across lanes (a shuffle tree),
// not in expert order. They agree with the CPU to a few float64 ulps before the final rounding
// to float32 (tests/kernels/test_cuda_ops.py: 1e-6).
// Plan: a stable radix sort of the slot ids (cub::DeviceRadixSort::SortPairs, keys = ids,
// values = slot index) gives perm; counts and offsets are lower bounds in the sorted keys.
#include <cub/device/device_radix_sort.cuh>

#include <cfloat>
#include <cstdint>

#include "moe_fast/cuda_kernels.h"
#include "route_params.cuh"

namespace moe_fast {
namespace cuda {
namespace {

constexpr int kBlock = 256;
constexpr int32_t kNone = 0x7fffffff;  // "no candidate" index in the argmax
constexpr size_t kAlign = 256;

// Strict order of argmax candidates: a valid one beats none, then larger value, then lower index.
__device__ __forceinline__ bool better(float av, int32_t ai, float bv, int32_t bi) {
  if (ai == kNone) return false;
  if (bi == kNone) return true;
  return av > bv || (av == bv && ai < bi);
}

template <int G, typename scalar_t, int VPT>
__global__ void __launch_bounds__(kBlock) route_kernel(const scalar_t* __restrict__ logits, RouteParams p,
                                                       float* __restrict__ weights, int32_t* __restrict__ ids) {
  static_assert(G == 8 || G == 16 || G == 32, "group width must divide a warp");
  const int64_t t = (static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x) / G;
  const int lane = static_cast<int>(threadIdx.x % G);
  const bool valid = t < p.num_tokens;
  const int32_t E = p.num_experts;
  const int32_t k = p.top_k;

  // Every lane of the warp stays to the end: the shuffles below need all of them.
  float v[VPT];
  bool allowed[VPT];  // may be chosen (kept, in range, real token)
  bool open[VPT];     // allowed and not chosen yet
  const scalar_t* row = logits + (valid ? t : 0) * E;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int32_t e = lane + i * G;
    allowed[i] = valid && e < E && (p.keep == nullptr || p.keep[e] != 0);
    v[i] = allowed[i] ? sanitize(to_float(row[e])) : -INFINITY;
    open[i] = allowed[i];
  }

  float top_v[kMaxTopK];
  int32_t top_i[kMaxTopK];
#pragma unroll
  for (int j = 0; j < kMaxTopK; ++j) {
    top_v[j] = -INFINITY;
    top_i[j] = kNone;
    if (j < k) {
      float bv = -INFINITY;
      int32_t bi = kNone;
#pragma unroll
      for (int i = 0; i < VPT; ++i) {  // ascending e inside the lane: strict '>' keeps the lower index
        if (open[i] && (bi == kNone || v[i] > bv)) {
          bv = v[i];
          bi = lane + i * G;
        }
      }
#pragma unroll
      for (int off = G / 2; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, off, G);
        const int32_t oi = __shfl_xor_sync(0xffffffffu, bi, off, G);
        if (better(ov, oi, bv, bi)) {
          bv = ov;
          bi = oi;
        }
      }
      // `better` is a strict total order, so every lane of the group now holds the same winner.
      top_v[j] = bv;
      top_i[j] = bi;
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        if (lane + i * G == bi) open[i] = false;
      }
    }
  }

  // A row with no finite allowed logit is taken as all-equal logits.
  const bool degenerate = top_v[0] == -INFINITY;
  if (degenerate) {
#pragma unroll
    for (int j = 0; j < kMaxTopK; ++j) top_v[j] = 0.f;
  }

  double z = 0.0;  // softmax partition over allowed experts, relative to l_0 (renormalize=False)
  if (!p.renormalize) {
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if (allowed[i]) z += degenerate ? 1.0 : exp(static_cast<double>(v[i]) - static_cast<double>(top_v[0]));
    }
#pragma unroll
    for (int off = G / 2; off > 0; off >>= 1) z += __shfl_xor_sync(0xffffffffu, z, off, G);
  }
  if (!valid || lane != 0) return;

  bool skipped[kMaxTopK];
  route_slot_weights(top_v, k, p.has_skip, p.skip_gap, p.renormalize, z, weights + t * k, skipped);
  int32_t* i_out = ids + t * k;
#pragma unroll
  for (int j = 0; j < kMaxTopK; ++j) {
    if (j < k) {
      i_out[j] = skipped[j] || top_i[j] == kNone ? E : top_i[j];  // kNone: keep allowed < k experts
    }
  }
}

template <int G, int VPT, typename scalar_t>
void launch_route(const void* logits, const RouteParams& p, float* weights, int32_t* ids, cudaStream_t stream) {
  const int64_t threads = p.num_tokens * G;
  const unsigned blocks = static_cast<unsigned>((threads + kBlock - 1) / kBlock);
  route_kernel<G, scalar_t, VPT><<<blocks, kBlock, 0, stream>>>(static_cast<const scalar_t*>(logits), p, weights, ids);
}

template <typename scalar_t>
void launch_route_typed(const void* logits, const RouteParams& p, float* weights, int32_t* ids,
                        cudaStream_t stream) {
  const int32_t E = p.num_experts;
  if (E <= 8) return launch_route<8, 1, scalar_t>(logits, p, weights, ids, stream);
  if (E <= 16) return launch_route<16, 1, scalar_t>(logits, p, weights, ids, stream);
  if (E <= 32) return launch_route<32, 1, scalar_t>(logits, p, weights, ids, stream);
  if (E <= 64) return launch_route<32, 2, scalar_t>(logits, p, weights, ids, stream);
  if (E <= 128) return launch_route<32, 4, scalar_t>(logits, p, weights, ids, stream);
  if (E <= 256) return launch_route<32, 8, scalar_t>(logits, p, weights, ids, stream);
  return launch_route<32, 16, scalar_t>(logits, p, weights, ids, stream);  // E <= kMaxExperts = 512
}

__global__ void iota_kernel(int32_t* out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = static_cast<int32_t>(i);
}

__device__ __forceinline__ int64_t lower_bound(const uint32_t* keys, int64_t n, uint32_t value) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (keys[mid] < value) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// offsets[b] = first sorted position of bucket b (b = E: the skipped slots); counts[e] = its size.
__global__ void bounds_kernel(const uint32_t* sorted_keys, int64_t n, int32_t num_experts, int32_t* counts,
                              int32_t* offsets) {
  const int32_t b = static_cast<int32_t>(blockIdx.x * blockDim.x + threadIdx.x);
  if (b > num_experts) return;
  const int64_t lo = lower_bound(sorted_keys, n, static_cast<uint32_t>(b));
  offsets[b] = static_cast<int32_t>(lo);
  if (b < num_experts) counts[b] = static_cast<int32_t>(lower_bound(sorted_keys, n, static_cast<uint32_t>(b) + 1) - lo);
}

size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Bits that hold every key 0..E.
int key_bits(int32_t num_experts) {
  int bits = 1;
  while ((int64_t{1} << bits) <= num_experts) ++bits;
  return bits;
}

size_t sort_temp_bytes(int64_t num_slots, int32_t num_experts) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
                                  static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
                                  static_cast<int>(num_slots), 0, key_bits(num_experts));
  return bytes;
}

}  // namespace

size_t route_workspace_bytes(int64_t num_slots, int32_t num_experts) {
  const size_t slot_bytes = align_up(static_cast<size_t>(num_slots) * sizeof(int32_t));
  return 2 * slot_bytes + align_up(sort_temp_bytes(num_slots, num_experts));
}

cudaError_t route(DType dtype, const void* logits, const RouteArgs& args, float* weights, int32_t* ids,
                  int32_t* counts, int32_t* offsets, int32_t* perm, void* workspace, size_t workspace_bytes,
                  cudaStream_t stream) {
  if (validate_route(args) != nullptr) return cudaErrorInvalidValue;  // validate_route names the problem
  const int64_t T = args.num_tokens;
  const int32_t E = args.num_experts;
  const int64_t n = T * args.top_k;  // <= INT32_MAX after validate_route
  if (workspace_bytes < route_workspace_bytes(n, E)) return cudaErrorInvalidValue;
  if (T > 0) {
    const RouteParams p = route_params(args);
    MOE_FAST_DISPATCH_DTYPE(dtype, return cudaErrorInvalidValue,
                            launch_route_typed<scalar_t>(logits, p, weights, ids, stream))
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return dispatch_plan(ids, n, E, counts, offsets, perm, workspace, workspace_bytes, stream);
}

cudaError_t dispatch_plan(const int32_t* ids, int64_t num_slots, int32_t num_experts, int32_t* counts,
                          int32_t* offsets, int32_t* perm, void* workspace, size_t workspace_bytes,
                          cudaStream_t stream) {
  const int64_t n = num_slots;
  const int32_t E = num_experts;
  if (n < 0 || n > INT32_MAX || E < 1 || E > kMaxExperts) return cudaErrorInvalidValue;
  if (workspace_bytes < route_workspace_bytes(n, E)) return cudaErrorInvalidValue;
  if (n > 0) {
    char* base = static_cast<char*>(workspace);
    const size_t slot_bytes = align_up(static_cast<size_t>(n) * sizeof(int32_t));
    uint32_t* sorted_keys = reinterpret_cast<uint32_t*>(base);
    int32_t* slot_index = reinterpret_cast<int32_t*>(base + slot_bytes);
    void* temp = base + 2 * slot_bytes;
    size_t temp_bytes = sort_temp_bytes(n, E);
    iota_kernel<<<static_cast<unsigned>((n + kBlock - 1) / kBlock), kBlock, 0, stream>>>(slot_index, n);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    // ids hold 0..E, so reading them as unsigned keeps their order. Radix sort is stable.
    err = cub::DeviceRadixSort::SortPairs(temp, temp_bytes, reinterpret_cast<const uint32_t*>(ids), sorted_keys,
                                          slot_index, perm, static_cast<int>(n), 0, key_bits(E), stream);
    if (err != cudaSuccess) return err;
    bounds_kernel<<<(E + 1 + kBlock - 1) / kBlock, kBlock, 0, stream>>>(sorted_keys, n, E, counts, offsets);
  } else {
    // No slots: every count and offset is zero.
    bounds_kernel<<<(E + 1 + kBlock - 1) / kBlock, kBlock, 0, stream>>>(nullptr, 0, E, counts, offsets);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace moe_fast
