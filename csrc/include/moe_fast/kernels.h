// moe_fast kernels: the torch-free C++ API.
//
// Everything here works on raw pointers so that other MoE projects, the C++ tests and the CUDA
// sources can use the kernels without torch. The torch bindings in csrc/bindings/ check every
// tensor and call these; the exact semantics are specified by moe_fast/reference.py.
#pragma once
#include <cstdint>

#include "moe_fast/dtype.h"

namespace moe_fast {

constexpr int32_t kMaxTopK = 8;
constexpr int32_t kMaxExperts = 256;
constexpr int32_t kMaskWords = kMaxExperts / 64;  // 64-bit words in one expert bit mask

// ---------------------------------------------------------------------------------------------
// Op 1: fused routing (softmax, top-k, renormalize, threshold skipping) and the dispatch plan.
// ---------------------------------------------------------------------------------------------
struct RouteArgs {
  int64_t num_tokens = 0;      // T
  int32_t num_experts = 0;     // E, 1..256
  int32_t top_k = 0;           // k, 1..8, k <= number of allowed experts
  bool renormalize = true;     // weights sum to 1 over the chosen slots
  // [k] or nullptr. Slot j >= 1 is skipped when double(l_0) - double(l_j) > skip_gap[j], i.e.
  // w_j < beta_j * w_0 with skip_gap[j] = -log(beta_j); +inf never skips. skip_gap[0] is unused.
  const double* skip_gap = nullptr;
  // [E] or nullptr: nonzero = the expert may be chosen. Masked experts act as logit -inf and
  // are never chosen, whatever the row holds.
  const uint8_t* keep = nullptr;
};

// Bit mask of kept experts: bit e of word e / 64.
struct ExpertMask {
  uint64_t words[kMaskWords];
};

// ---------------------------------------------------------------------------------------------
// Op 2b: squared reconstruction error of candidate keep-sets, per token.
// For candidate S and token t the routing weights w^S are those of Op 1 with every expert outside
// S masked, restricted to the token's M ranked experts ids[t, :] (the caller guarantees that at
// least k of them are in S, i.e. |dropped| <= M - k). Then
//   layer-wise:  err = d^T G d,  d = w^S - target_weights[t]          (over the M ranked slots)
//   progressive: err = w^T G w - 2 w . cross[t] + target_sq[t]
// computed in float64.
// ---------------------------------------------------------------------------------------------
struct SubsetLossArgs {
  int64_t num_tokens = 0;         // T
  int32_t num_experts = 0;        // E
  int32_t rank = 0;               // M: ranked experts per token
  int32_t top_k = 0;              // k
  bool renormalize = true;
  const float* gram = nullptr;            // [T, M(M+1)/2]
  const int32_t* ids = nullptr;           // [T, M] ranked expert ids (Op 1 order)
  const float* logits = nullptr;          // [T, E] router logits
  const float* target_weights = nullptr;  // [T, M] or nullptr (layer-wise)
  const float* cross = nullptr;           // [T, M] or nullptr (progressive)
  const float* target_sq = nullptr;       // [T]    or nullptr (progressive)
};

// Tokens of one (candidate, group) are summed in ascending order, in chunks of kLossChunk tokens
// whose float64 partial sums are then added in order: a fixed order, so the result does not
// depend on how many threads share the work.
constexpr int64_t kLossChunk = 4096;

namespace cpu {

// Routes tokens [t_begin, t_end) of logits [T, E] (element type `dtype`) into
// weights [T, k] float32 and ids [T, k] int32 (a skipped slot: id E, weight 0).
void route_rows(DType dtype, const void* logits, const RouteArgs& args, int64_t t_begin,
                int64_t t_end, float* weights, int32_t* ids);

// Adds the slots of tokens [t_begin, t_end) to counts[E + 1] (bucket E: skipped slots).
void plan_histogram(const int32_t* ids, int64_t t_begin, int64_t t_end, int32_t top_k,
                    int32_t num_experts, int32_t* counts);

// Writes the flat slot index t * k + j of tokens [t_begin, t_end) to perm[cursor[bucket]++];
// cursor[E + 1] holds, per bucket, the first position owned by this token range. A stable
// counting sort: tokens stay ascending inside every expert, whatever the split into ranges.
void plan_scatter(const int32_t* ids, int64_t t_begin, int64_t t_end, int32_t top_k,
                  int32_t num_experts, int32_t* cursor, int32_t* perm);

// Whole op on one thread: weights [T, k], ids [T, k], counts [E], offsets [E + 1], perm [T * k].
void route(DType dtype, const void* logits, const RouteArgs& args, float* weights, int32_t* ids,
           int32_t* counts, int32_t* offsets, int32_t* perm);

// ---------------------------------------------------------------------------------------------
// Op 2a: per-token Gram entries of the rank-bounded expert outputs.
// Packing: for M outputs per token, the upper triangle row by row, P = M * (M + 1) / 2 entries:
// gram[t, gram_index(i, j, M)] = <y_t,i , y_t,j> for i <= j.
// ---------------------------------------------------------------------------------------------
inline int64_t gram_index(int64_t i, int64_t j, int64_t m) {
  if (i > j) {
    const int64_t s = i;
    i = j;
    j = s;
  }
  return i * m - i * (i - 1) / 2 + (j - i);
}

// outputs [T, M, H] and target [T, H] (or nullptr) of element type `dtype`;
// writes gram [T, P], and when target is given cross [T, M] = <y_t,i , z_t> and
// target_sq [T] = ||z_t||^2, all float32 accumulated in float32, for tokens [t_begin, t_end).
void expert_gram_rows(DType dtype, const void* outputs, const void* target, int64_t rank,
                      int64_t hidden, int64_t t_begin, int64_t t_end, float* gram, float* cross,
                      float* target_sq);

// Packs a bool mask keep[E] into bits.
ExpertMask pack_mask(const uint8_t* keep, int32_t num_experts);

// sums[c] = squared error of candidate masks[c] summed over tokens[0..n) in that order (float64).
void subset_loss_tokens(const SubsetLossArgs& args, const ExpertMask* masks, int64_t num_candidates,
                        const int64_t* tokens, int64_t n, double* sums);


// Whole op on one thread: keep [C, E] (nonzero = kept), group [T] in [0, G) -> out [C, G].
void subset_loss(const SubsetLossArgs& args, const uint8_t* keep, int64_t num_candidates,
                 const int64_t* group, int64_t num_groups, double* out);

}  // namespace cpu
}  // namespace moe_fast
