// Op 2a on the GPU: per-token Gram entries of the rank-bounded expert outputs.
//
// One block per token. Its "dot tasks" are the P = M(M+1)/2 packed pairs (i <= j, row by row),
// then, in target mode (cross given), the M cross products <y_i, z> and ||z||^2. Each warp takes tasks in turn and
// computes one dot product of length H: lanes stride over H in float32, then a fixed shuffle tree.
// A token's outputs are read once from memory and then mostly from L1/L2.
#include <cstdint>

#include "moe_fast/cuda_kernels.h"

namespace moe_fast {
namespace cuda {
namespace {

constexpr int kBlock = 256;
constexpr int kWarps = kBlock / 32;

template <typename scalar_t>
__device__ __forceinline__ float warp_dot(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                          int64_t n, int lane) {
  float acc = 0.f;
  for (int64_t h = lane; h < n; h += 32) acc += to_float(a[h]) * to_float(b[h]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  return acc;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock) gram_kernel(const scalar_t* __restrict__ outputs,
                                                      const scalar_t* __restrict__ target, int64_t m, int64_t h,
                                                      float* __restrict__ gram, float* __restrict__ cross,
                                                      float* __restrict__ target_sq) {
  const int64_t t = blockIdx.x;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t pairs = m * (m + 1) / 2;
  const int64_t tasks = pairs + (cross != nullptr ? m + 1 : 0);  // target mode: cross and ||z||^2 too
  const scalar_t* y = outputs + t * m * h;
  const scalar_t* z = target != nullptr ? target + t * h : y;  // nullptr only when h == 0: dots are 0
  for (int64_t q = warp; q < tasks; q += kWarps) {  // warp-uniform loop
    float v;
    if (q < pairs) {
      // Packed index q -> (i, j), the upper triangle row by row.
      int64_t i = 0, r = q;
      while (r >= m - i) {
        r -= m - i;
        ++i;
      }
      const int64_t j = i + r;
      v = warp_dot(y + i * h, y + j * h, h, lane);
      if (lane == 0) gram[t * pairs + q] = v;
    } else if (q < pairs + m) {
      const int64_t i = q - pairs;
      v = warp_dot(y + i * h, z, h, lane);
      if (lane == 0) cross[t * m + i] = v;
    } else {
      v = warp_dot(z, z, h, lane);
      if (lane == 0) target_sq[t] = v;
    }
  }
}

template <typename scalar_t>
void launch_gram(const void* outputs, const void* target, int64_t t, int64_t m, int64_t h, float* gram,
                 float* cross, float* target_sq, cudaStream_t stream) {
  gram_kernel<scalar_t><<<static_cast<unsigned>(t), kBlock, 0, stream>>>(
      static_cast<const scalar_t*>(outputs), static_cast<const scalar_t*>(target), m, h, gram, cross, target_sq);
}

}  // namespace

cudaError_t expert_gram(DType dtype, const void* outputs, const void* target, int64_t num_tokens, int64_t rank,
                        int64_t hidden, float* gram, float* cross, float* target_sq, cudaStream_t stream) {
  if (validate_expert_gram(outputs, target, num_tokens, rank, hidden, gram, cross, target_sq) != nullptr) {
    return cudaErrorInvalidValue;  // validate_expert_gram names the problem
  }
  if (num_tokens == 0) return cudaSuccess;
  MOE_FAST_DISPATCH_DTYPE(dtype, return cudaErrorInvalidValue,
                          launch_gram<scalar_t>(outputs, target, num_tokens, rank, hidden, gram, cross, target_sq, stream))
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace moe_fast
