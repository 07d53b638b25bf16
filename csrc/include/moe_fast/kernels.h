// moe_fast kernels: the torch-free C++ API.
//
// Everything here works on raw pointers so that other MoE projects, the C++ tests and the CUDA
// sources can use the kernels without torch. The torch bindings in csrc/bindings/ check every
// tensor and call these; the exact semantics are specified by moe_fast/kernels/reference.py.
//
// Errors. The whole-op entry points check their arguments against the kernels' limits before
// touching memory and report instead of computing wrong numbers:
//   * the CPU ones (cpu::route, cpu::expert_gram, cpu::subset_loss) return an Error: nullptr on
//     success, else a static message naming the violated limit; nothing is written then;
//   * the CUDA launchers (cuda_kernels.h) return cudaErrorInvalidValue for the same arguments;
//     the validate_* function below gives the message.
// No exceptions are thrown. The row-level building blocks (route_rows, plan_*, expert_gram_rows,
// subset_loss_tokens) do not check: validate first.
#pragma once
#include <climits>
#include <cmath>
#include <cstdint>
#include <vector>

#include "moe_fast/dtype.h"
#include "moe_fast/rules.h"

namespace moe_fast {

// nullptr = success; otherwise a static, human-readable message (never freed).
using Error = const char*;

// ---------------------------------------------------------------------------------------------
// Op 1: fused routing (softmax, top-k, renormalize, threshold skipping) and the dispatch plan.
// ---------------------------------------------------------------------------------------------
struct RouteArgs {
  int64_t num_tokens = 0;      // T, with T * k <= INT32_MAX (perm holds int32 slot indices)
  int32_t num_experts = 0;     // E, 1..512
  int32_t top_k = 0;           // k, 1..8, k <= number of allowed experts
  bool renormalize = true;     // weights sum to 1 over the chosen slots
  // [k] or nullptr. Slot j >= 1 is skipped when double(l_0) - double(l_j) > skip_gap[j], i.e.
  // w_j < beta_j * w_0 with skip_gap[j] = -log(beta_j) >= 0 (skip_gaps_from_beta in rules.h);
  // +inf never skips. skip_gap[0] is unused.
  const double* skip_gap = nullptr;
  // [E] or nullptr: nonzero = the expert may be chosen. Masked experts act as logit -inf and
  // are never chosen, whatever the row holds.
  const uint8_t* keep = nullptr;
};

// Op 1 for any router (docs/ROUTING.md; semantics: route_spec in moe_fast/kernels/reference.py): the
// scoring, a selection bias, expert groups and a scaling factor on top of RouteArgs. Same
// outputs as Op 1. The skip test compares log-weights (rules.h: skips_by_log_ratio): the logits
// for the softmax scorings (exactly Op 1's rule), the logs of the float32 sigmoid scores for
// sigmoid. Plain softmax with scaling 1 is Op 1 itself; the bindings send it there.
struct RouteSpecArgs {
  RouteArgs route;                        // T, E, k, renormalize, skip_gap [k], keep [E]: as for Op 1
  Scoring scoring = Scoring::Softmax;
  const float* selection_bias = nullptr;  // [E] finite, or nullptr; sigmoid only: added for choosing
  int32_t n_group = 1;                    // groups of E / n_group consecutive experts (sigmoid only)
  int32_t topk_group = 1;                 // eligible groups, 1..n_group (== n_group: no group limit)
  float scaling = 1.0f;                   // finite, > 0: multiplies the final weights
};

// Whether expert groups can exclude experts (more than one group and not all eligible).
inline bool route_spec_grouped(const RouteSpecArgs& a) {
  return a.scoring == Scoring::Sigmoid && a.topk_group < a.n_group;
}

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
  // The routing descriptor without groups (docs/ROUTING.md; RouteSpecArgs). ids are ranked by
  // ranking_value (rules.h): the logits, or for sigmoid the biased scores. Weights: softmax as
  // above; softmax_topk the softmax of the chosen logits; sigmoid the unbiased scores (over
  // their sum + 1e-20 with renormalize); all times scaling. Grouped routers are not supported.
  Scoring scoring = Scoring::Softmax;
  const float* selection_bias = nullptr;  // [E] finite, or nullptr; sigmoid only (ranking only)
  double scaling = 1.0;                   // finite, > 0
};

// Limits of Op 1: E in 1..512, k in 1..min(8, E), T >= 0, T * k <= INT32_MAX, skip gaps >= 0.
// The keep mask is not read (on the GPU it is device memory): cpu::route counts it itself.
inline Error validate_route(const RouteArgs& a) {
  if (a.num_experts < 1 || a.num_experts > kMaxExperts) return "route: number of experts E must be in 1..512";
  if (a.top_k < 1 || a.top_k > kMaxTopK) return "route: k must be in 1..8";
  if (a.top_k > a.num_experts) return "route: k must not exceed the number of experts";
  if (a.num_tokens < 0) return "route: number of tokens T must be >= 0";
  if (a.num_tokens > INT32_MAX / a.top_k) return "route: T * k must fit in int32 (perm holds int32 slot indices)";
  if (a.skip_gap != nullptr) {
    for (int32_t j = 1; j < a.top_k; ++j) {
      if (!(a.skip_gap[j] >= 0.0)) return "route: skip gaps must be >= 0 (-log(beta) with beta in [0, 1])";
    }
  }
  return nullptr;
}

// Limits of the general Op 1: those of validate_route, a known scoring, 1 <= topk_group <=
// n_group; for sigmoid n_group divides E (eligible groups holding fewer than k experts are
// filled from the others, by index, as transformers does); a bias
// and groups only with sigmoid; scaling finite and > 0. The bias values are not read (on the GPU
// they are device memory): cpu::route_spec checks that they are finite.
inline Error validate_route_spec(const RouteSpecArgs& a) {
  if (const Error err = validate_route(a.route)) return err;
  if (a.scoring != Scoring::Softmax && a.scoring != Scoring::Sigmoid && a.scoring != Scoring::SoftmaxTopK) {
    return "route: scoring must be softmax, sigmoid or softmax_topk";
  }
  if (a.n_group < 1 || a.topk_group < 1 || a.topk_group > a.n_group) {
    return "route: need n_group >= 1 and 1 <= topk_group <= n_group";
  }
  if (a.scoring == Scoring::Sigmoid) {
    if (a.route.num_experts % a.n_group != 0) return "route: n_group must divide the number of experts E";
  } else if (a.selection_bias != nullptr || a.topk_group != a.n_group) {
    return "route: a selection bias and expert groups need scoring sigmoid";
  }
  if (!(std::isfinite(a.scaling) && a.scaling > 0.0f)) return "route: scaling must be finite and > 0";
  return nullptr;
}

// Limits of Op 2a: T >= 0, M in 1..512, H >= 0, T <= INT32_MAX (one GPU block per token).
// cross and target_sq are given together (target mode) or not at all; in target mode `target`
// may be nullptr only when H == 0 (cross and target_sq are then zeros).
inline Error validate_expert_gram(const void* outputs, const void* target, int64_t num_tokens, int64_t rank,
                                  int64_t hidden, const float* gram, const float* cross, const float* target_sq) {
  if (num_tokens < 0 || hidden < 0) return "expert_gram: T and H must be >= 0";
  if (rank < 1 || rank > kMaxExperts) return "expert_gram: M must be in 1..512";
  if (num_tokens > INT32_MAX) return "expert_gram: T must be at most INT32_MAX";
  if ((cross == nullptr) != (target_sq == nullptr)) return "expert_gram: give cross and target_sq together";
  if (cross == nullptr && target != nullptr) return "expert_gram: a target needs cross and target_sq outputs";
  if (num_tokens > 0 && gram == nullptr) return "expert_gram: gram is null";
  if (num_tokens > 0 && hidden > 0 && (outputs == nullptr || (cross != nullptr && target == nullptr))) {
    return "expert_gram: outputs (and in target mode target) must be non-null when T, H > 0";
  }
  return nullptr;
}

// Limits of Op 2b that need no data: E in 1..512, k in 1..8, k <= M <= E, T, C, G >= 0 (G >= 1
// when T > 0), target_weights xor (cross and target_sq), the inputs non-null when T > 0.
inline Error validate_subset_loss(const SubsetLossArgs& a, int64_t num_candidates, int64_t num_groups) {
  if (a.num_experts < 1 || a.num_experts > kMaxExperts) return "subset_loss: number of experts E must be in 1..512";
  if (a.top_k < 1 || a.top_k > kMaxTopK) return "subset_loss: k must be in 1..8";
  if (a.rank < a.top_k || a.rank > a.num_experts) return "subset_loss: M must satisfy k <= M <= E";
  if (a.num_tokens < 0 || num_candidates < 0 || num_groups < 0) return "subset_loss: T, C and G must be >= 0";
  if (a.num_tokens > 0 && num_groups < 1) return "subset_loss: num_groups must be >= 1";
  const bool layerwise = a.target_weights != nullptr;
  const bool progressive = a.cross != nullptr && a.target_sq != nullptr;
  if (layerwise == (a.cross != nullptr || a.target_sq != nullptr) || (!layerwise && !progressive)) {
    if (a.num_tokens > 0) return "subset_loss: give either target_weights or cross and target_sq";
  }
  if (a.num_tokens > 0 && (a.gram == nullptr || a.ids == nullptr || a.logits == nullptr)) {
    return "subset_loss: gram, ids and logits must be non-null";
  }
  if (a.scoring != Scoring::Softmax && a.scoring != Scoring::Sigmoid && a.scoring != Scoring::SoftmaxTopK) {
    return "subset_loss: scoring must be softmax, sigmoid or softmax_topk";
  }
  if (a.selection_bias != nullptr && a.scoring != Scoring::Sigmoid) {
    return "subset_loss: a selection bias needs scoring sigmoid";
  }
  if (!(std::isfinite(a.scaling) && a.scaling > 0.0)) return "subset_loss: scaling must be finite and > 0";
  return nullptr;
}

// Op 2b's conditions on host-readable data (cpu::subset_loss checks them; a GPU caller must
// guarantee them): a finite selection bias, every ids row ranked by ranking_value (ranked_row_ok
// and ranking_value in rules.h), every group id in [0, G),
// every candidate keeps >= k experts and drops <= M - k, a layer-wise target has <= k nonzero
// weights per token. O(T * (M + E) + C * E).
inline Error validate_subset_loss_data(const SubsetLossArgs& a, const uint8_t* keep, int64_t num_candidates,
                                       const int64_t* group, int64_t num_groups) {
  const int32_t m = a.rank, E = a.num_experts;
  for (int64_t c = 0; c < num_candidates; ++c) {
    const int64_t kept = count_nonzero(keep + c * E, E);
    if (!candidate_keeps_k(kept, a.top_k)) return "subset_loss: a candidate keeps fewer than k experts";
    if (!candidate_drops_within_rank(kept, E, m, a.top_k)) {
      return "subset_loss: a candidate drops more than M - k experts";
    }
  }
  if (a.selection_bias != nullptr) {
    for (int32_t e = 0; e < E; ++e) {
      if (!std::isfinite(a.selection_bias[e])) return "subset_loss: selection_bias must be finite";
    }
  }
  float values[kMaxExperts];  // the row's ranking values (ranking_value in rules.h)
  for (int64_t t = 0; t < a.num_tokens; ++t) {
    if (group[t] < 0 || group[t] >= num_groups) return "subset_loss: group ids must lie in [0, num_groups)";
    for (int32_t e = 0; e < E; ++e) values[e] = ranking_value(a.scoring, a.logits[t * E + e], a.selection_bias, e);
    if (!ranked_row_ok(a.ids + t * m, values, m, E)) {
      return "subset_loss: an ids row is not ranked (ids in [0, E), each expert once, in route's order)";
    }
    if (a.target_weights != nullptr) {
      if (count_nonzero(a.target_weights + t * m, m) > a.top_k) {
        return "subset_loss: target_weights must have at most k nonzero weights per token";
      }
    }
  }
  return nullptr;
}

// Tokens of one (candidate, group) are summed in ascending order, in chunks of kLossChunk tokens
// whose float64 partial sums are then added in order: a fixed order, so the result does not
// depend on how many threads share the work.
constexpr int64_t kLossChunk = 4096;

// Tokens bucketed by group, ascending inside each group: order[start[g] .. start[g + 1]) are the
// tokens of group g. group [T] must lie in [0, G); start has G + 1 entries, order T.
inline void group_order(const int64_t* group, int64_t num_tokens, int64_t num_groups, std::vector<int64_t>& start,
                        std::vector<int64_t>& order) {
  start.assign(num_groups + 1, 0);
  for (int64_t t = 0; t < num_tokens; ++t) ++start[group[t] + 1];
  for (int64_t g = 0; g < num_groups; ++g) start[g + 1] += start[g];
  order.resize(num_tokens);
  std::vector<int64_t> cursor(start.begin(), start.end() - 1);
  for (int64_t t = 0; t < num_tokens; ++t) order[cursor[group[t]]++] = t;
}

// A chunk: positions [begin, end) of `order`, all in one group, at most kLossChunk of them.
struct LossChunk {
  int64_t begin;
  int64_t end;
};

// From group starts start[G + 1] (positions in `order`), fills chunks and first_chunk[G + 1]
// (chunks of group g: [first_chunk[g], first_chunk[g + 1])). The one cut of every device.
inline void build_loss_chunks(const int64_t* start, int64_t num_groups, std::vector<LossChunk>& chunks,
                              std::vector<int64_t>& first_chunk) {
  chunks.clear();
  first_chunk.assign(num_groups + 1, 0);
  for (int64_t g = 0; g < num_groups; ++g) {
    first_chunk[g] = static_cast<int64_t>(chunks.size());
    for (int64_t i = start[g]; i < start[g + 1]; i += kLossChunk) {
      chunks.push_back({i, start[g + 1] < i + kLossChunk ? start[g + 1] : i + kLossChunk});
    }
  }
  first_chunk[num_groups] = static_cast<int64_t>(chunks.size());
}

namespace cpu {

// CPU instruction levels of the route kernel: the scalar code (baseline x86-64, or any CPU) and
// an AVX2 + FMA + F16C kernel, eight tokens per register. Both give the same ids (and so the
// same plan); weights agree within 2 float32 ulps. One build holds both; route_rows picks at run
// time, like ATen's CPU dispatch.
enum class CpuLevel : int32_t { Default = 0, Avx2 = 1 };

// Whether this build and this CPU can run `level` (Default: always).
bool cpu_level_supported(CpuLevel level);

// The level route_rows uses, fixed at the first call: the best supported one, unless the
// environment asks for less. MOE_FAST_CPU_CAPABILITY, or when unset ATEN_CPU_CAPABILITY (the
// variable that sets PyTorch's own level), = "default" selects the scalar code; any other value
// (avx2, avx512, ...) the best supported level.
CpuLevel route_cpu_level();

// "default" or "avx2".
const char* cpu_level_name(CpuLevel level);

// Routes tokens [t_begin, t_end) of logits [T, E] (element type `dtype`) into
// weights [T, k] float32 and ids [T, k] int32 (a skipped slot: id E, weight 0), at
// route_cpu_level().
void route_rows(DType dtype, const void* logits, const RouteArgs& args, int64_t t_begin,
                int64_t t_end, float* weights, int32_t* ids);

// route_rows at a given level (the tests compare the levels); a level this CPU or build lacks
// runs the scalar code.
void route_rows_at(CpuLevel level, DType dtype, const void* logits, const RouteArgs& args, int64_t t_begin,
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
// Checks validate_route and that keep (if any) allows at least k experts.
Error route(DType dtype, const void* logits, const RouteArgs& args, float* weights, int32_t* ids,
           int32_t* counts, int32_t* offsets, int32_t* perm);

// The general Op 1 (RouteSpecArgs) for tokens [t_begin, t_end): weights [T, k], ids [T, k] as
// route_rows gives them. One scalar pass per token (route_spec.cpp).
void route_spec_rows(DType dtype, const void* logits, const RouteSpecArgs& args, int64_t t_begin, int64_t t_end,
                     float* weights, int32_t* ids);

// Whole general op on one thread: weights [T, k], ids [T, k], counts [E], offsets [E + 1],
// perm [T * k]. Checks validate_route_spec, that keep (if any) allows at least k experts and that
// the selection bias is finite.
Error route_spec(DType dtype, const void* logits, const RouteSpecArgs& args, float* weights, int32_t* ids,
                 int32_t* counts, int32_t* offsets, int32_t* perm);

// ---------------------------------------------------------------------------------------------
// Op 2a: per-token Gram entries of the rank-bounded expert outputs.
// Packing: gram_index in rules.h (the upper triangle row by row, P = M * (M + 1) / 2 entries):
// gram[t, gram_index(i, j, M)] = <y_t,i , y_t,j> for i <= j.
// ---------------------------------------------------------------------------------------------

// outputs [T, M, H] and target [T, H] of element type `dtype`; writes gram [T, P], and when
// cross is given (target mode) cross [T, M] = <y_t,i , z_t> and target_sq [T] = ||z_t||^2, all
// float32 accumulated in float32, for tokens [t_begin, t_end). target may be nullptr in target
// mode only when H == 0.
void expert_gram_rows(DType dtype, const void* outputs, const void* target, int64_t rank,
                      int64_t hidden, int64_t t_begin, int64_t t_end, float* gram, float* cross,
                      float* target_sq);

// Whole op on one thread; checks validate_expert_gram.
Error expert_gram(DType dtype, const void* outputs, const void* target, int64_t num_tokens, int64_t rank,
                  int64_t hidden, float* gram, float* cross, float* target_sq);

// Packs a bool mask keep[E] (E <= kMaxExperts) into bits.
ExpertMask pack_mask(const uint8_t* keep, int32_t num_experts);

// sums[c] = squared error of candidate masks[c] summed over tokens[0..n) in that order (float64).
void subset_loss_tokens(const SubsetLossArgs& args, const ExpertMask* masks, int64_t num_candidates,
                        const int64_t* tokens, int64_t n, double* sums);


// Whole op on one thread: keep [C, E] (nonzero = kept), group [T] in [0, G) -> out [C, G].
// Checks validate_subset_loss and validate_subset_loss_data.
Error subset_loss(const SubsetLossArgs& args, const uint8_t* keep, int64_t num_candidates,
                 const int64_t* group, int64_t num_groups, double* out);

}  // namespace cpu
}  // namespace moe_fast
