// Op 2b on the GPU: squared reconstruction error of candidate keep-sets, summed per group.
//
// Grid: one block per (candidate tile, chunk); a chunk is at most kLossChunk tokens of one group
// (cuda_kernels.h). Thread i takes the chunk's positions i, i + kBlock, ... in order and adds, for
// each candidate of the tile, the float64 error of those tokens; a fixed shared-memory tree then
// sums the threads, giving partial[c, chunk]. A second kernel adds each group's chunks in order.
// Nothing depends on scheduling, so the result is the same on every run.
//
// What is promised against the CPU: the same formula up to rounding, not the same bits. The
// weights use one exp() per kept slot relative to the top kept logit (the CPU caches exp()s per
// token), nvcc contracts multiply-adds into FMAs, and the tokens of a chunk are summed per thread
// (strided) and then in a tree, not in ascending order. Losses agree to about 1e-12 relative; the
// search (moe_fast/pruning/search.py) treats candidates whose losses agree to TIE_RTOL = 1e-9
// relative as tied and takes the lexicographically smallest dropped set, so CPU and GPU choose the
// same set unless a loss lies within that rounding of the tie border.
#include <cfloat>
#include <cstdint>

#include "moe_fast/cuda_kernels.h"

namespace moe_fast {
namespace cuda {
namespace {

constexpr int kBlock = 256;
constexpr int kTile = 8;  // candidates per block: a token's data is read once for all of them

// Softmax weights w[0..n) of the candidate's experts at ranked positions slot[0..n) of `ids`: one
// exp() per kept slot relative to the top kept logit, divided by the chosen experts' sum
// (renormalize, softmax_topk) or by the kept experts' softmax mass.
__device__ void softmax_weights(const SubsetLossArgs& a, const ExpertMask& mask, const int32_t* ids, const float* lg,
                                const int32_t* slot, int32_t n, double* w) {
  float l0 = sanitize(lg[ids[slot[0]]]);
  const bool degenerate = l0 == -INFINITY;  // no finite kept logit: all taken as equal
  if (degenerate) l0 = 0.f;
  double sum = 0.0;
  for (int32_t j = 0; j < n; ++j) {
    const float lj = degenerate ? 0.f : sanitize(lg[ids[slot[j]]]);
    w[j] = j == 0 ? 1.0 : exp(static_cast<double>(lj) - static_cast<double>(l0));
    sum += w[j];
  }
  double scale = 1.0 / sum;
  if (!softmax_over_chosen(a.scoring, a.renormalize)) {
    double z = 0.0;
    for (int32_t e = 0; e < a.num_experts; ++e) {
      if (mask_has(mask, e)) z += degenerate ? 1.0 : exp(static_cast<double>(sanitize(lg[e])) - static_cast<double>(l0));
    }
    scale = 1.0 / z;
  }
  for (int32_t j = 0; j < n; ++j) w[j] *= scale;
}

// Squared error of token t from the candidate's weights w[0..n) at ranked positions slot[0..n).
__device__ double candidate_error(const SubsetLossArgs& a, int64_t t, const int32_t* slot, const double* w,
                                  int32_t n) {
  const int32_t m = a.rank;
  const float* g = a.gram + t * (static_cast<int64_t>(m) * (m + 1) / 2);
  if (a.target_weights != nullptr) {
    // d = w^S - target over the M ranked slots; at most 2k entries are nonzero.
    const float* tw = a.target_weights + t * m;
    int32_t pos[2 * kMaxTopK];
    double d[2 * kMaxTopK];
    int32_t nd = 0;
    int32_t next = 0;  // walks slot[] alongside i (slot is ascending)
    for (int32_t i = 0; i < m; ++i) {
      double v = -static_cast<double>(tw[i]);
      if (next < n && slot[next] == i) v += w[next++];
      if (v != 0.0) {
        pos[nd] = i;
        d[nd++] = v;
      }
      if (nd == 2 * kMaxTopK) break;  // the bindings reject targets with more than k nonzeros
    }
    double err = 0.0;
    for (int32_t x = 0; x < nd; ++x) {
      err += d[x] * d[x] * g[gram_index(pos[x], pos[x], m)];
      for (int32_t y = x + 1; y < nd; ++y) err += 2.0 * d[x] * d[y] * g[gram_index(pos[x], pos[y], m)];
    }
    return err;
  }
  const float* c = a.cross + t * m;
  double err = a.target_sq[t];
  for (int32_t x = 0; x < n; ++x) {
    err -= 2.0 * w[x] * c[slot[x]];
    err += w[x] * w[x] * g[gram_index(slot[x], slot[x], m)];
    for (int32_t y = x + 1; y < n; ++y) err += 2.0 * w[x] * w[y] * g[gram_index(slot[x], slot[y], m)];
  }
  return err;
}

// Squared error of token t under one candidate: the CPU's formula (candidate_weights and
// token_error in csrc/cpu/subset_loss.cpp) up to rounding, see above.
__device__ double token_error(const SubsetLossArgs& a, const ExpertMask& mask, int64_t t) {
  const int32_t m = a.rank;
  const int32_t k = a.top_k;
  const int32_t* ids = a.ids + t * m;
  const float* lg = a.logits + t * static_cast<int64_t>(a.num_experts);
  // The first k ranked experts that the candidate keeps, and their weights.
  int32_t slot[kMaxTopK];
  double w[kMaxTopK];
  const int32_t n = kept_ranked_slots(mask, ids, m, k, slot);
  if (n == 0) return 0.0;  // cannot happen: the binding checks every candidate keeps k ranked experts
  if (a.scoring == Scoring::Sigmoid) {
    for (int32_t j = 0; j < n; ++j) w[j] = sigmoid_score(sanitize(lg[ids[slot[j]]]));
    sigmoid_subset_weights(w, n, a.renormalize);
  } else {
    softmax_weights(a, mask, ids, lg, slot, n, w);
  }
  if (a.scaling != 1.0) {
    for (int32_t j = 0; j < n; ++j) w[j] *= a.scaling;
  }
  return candidate_error(a, t, slot, w, n);
}

// Sum of v over the block in a fixed tree; the result is valid on thread 0.
__device__ double block_sum(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
#pragma unroll
  for (int width = kBlock / 2; width > 0; width >>= 1) {
    if (threadIdx.x < width) shared[threadIdx.x] += shared[threadIdx.x + width];
    __syncthreads();
  }
  const double total = shared[0];
  __syncthreads();  // shared[] is reused by the next call
  return total;
}

__global__ void __launch_bounds__(kBlock) chunk_kernel(SubsetLossArgs a, const ExpertMask* __restrict__ masks,
                                                       int64_t num_candidates, const int64_t* __restrict__ order,
                                                       const LossChunk* __restrict__ chunks, int64_t num_chunks,
                                                       double* __restrict__ partial) {
  __shared__ double shared[kBlock];
  __shared__ ExpertMask tile_masks[kTile];
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) % num_chunks;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) / num_chunks * kTile;
  const int ct = static_cast<int>(num_candidates - c0 < kTile ? num_candidates - c0 : kTile);
  if (threadIdx.x < ct) tile_masks[threadIdx.x] = masks[c0 + threadIdx.x];
  __syncthreads();

  double acc[kTile];
#pragma unroll
  for (int c = 0; c < kTile; ++c) acc[c] = 0.0;
  const LossChunk ch = chunks[chunk];
  for (int64_t i = ch.begin + threadIdx.x; i < ch.end; i += kBlock) {
    const int64_t t = order[i];
#pragma unroll
    for (int c = 0; c < kTile; ++c) {
      if (c < ct) acc[c] += token_error(a, tile_masks[c], t);
    }
  }
#pragma unroll
  for (int c = 0; c < kTile; ++c) {
    if (c < ct) {  // block-uniform: every thread reaches the barriers in block_sum
      const double total = block_sum(acc[c], shared);
      if (threadIdx.x == 0) partial[(c0 + c) * num_chunks + chunk] = total;
    }
  }
}

// out[c, g] = sum of partial[c, first_chunk[g] .. first_chunk[g + 1]) in order (0 for empty groups).
__global__ void finish_kernel(const double* __restrict__ partial, int64_t num_candidates, int64_t num_chunks,
                              const int64_t* __restrict__ first_chunk, int64_t num_groups, double* __restrict__ out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= num_candidates * num_groups) return;
  const int64_t c = idx / num_groups, g = idx % num_groups;
  double total = 0.0;
  for (int64_t i = first_chunk[g]; i < first_chunk[g + 1]; ++i) total += partial[c * num_chunks + i];
  out[idx] = total;
}

}  // namespace

cudaError_t subset_loss(const SubsetLossArgs& args, const ExpertMask* masks, int64_t num_candidates,
                        const int64_t* order, const LossChunk* chunks, int64_t num_chunks,
                        const int64_t* first_chunk, int64_t num_groups, double* partial, double* out,
                        cudaStream_t stream) {
  // validate_subset_loss names the problem (E > 512 would read past the mask words).
  if (validate_subset_loss(args, num_candidates, num_groups) != nullptr || num_chunks < 0) return cudaErrorInvalidValue;
  if (num_candidates == 0 || num_groups == 0) return cudaSuccess;
  if (num_chunks > 0) {
    const int64_t tiles = (num_candidates + kTile - 1) / kTile;
    const int64_t blocks = tiles * num_chunks;
    if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
    chunk_kernel<<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(args, masks, num_candidates, order, chunks,
                                                                       num_chunks, partial);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const int64_t outputs = num_candidates * num_groups;
  finish_kernel<<<static_cast<unsigned>((outputs + kBlock - 1) / kBlock), kBlock, 0, stream>>>(
      partial, num_candidates, num_chunks, first_chunk, num_groups, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace moe_fast
