// The per-launch parameters both route kernels read (route.cu: softmax; route_spec.cu: any
// RoutingSpec, which extends them), filled from the host arguments in one place.
#pragma once
#include <cstdint>

#include "moe_fast/kernels.h"

namespace moe_fast {
namespace cuda {

struct RouteParams {
  int64_t num_tokens;
  int32_t num_experts;
  int32_t top_k;
  bool renormalize;
  bool has_skip;
  double skip_gap[kMaxTopK];  // slot j >= 1 skipped when the slot's gap to slot 0 exceeds skip_gap[j]
  const uint8_t* keep;        // [E] or nullptr
};

// args checked by validate_route; unused skip gaps are 0.
inline RouteParams route_params(const RouteArgs& args) {
  RouteParams p{};
  p.num_tokens = args.num_tokens;
  p.num_experts = args.num_experts;
  p.top_k = args.top_k;
  p.renormalize = args.renormalize;
  p.has_skip = args.skip_gap != nullptr;
  for (int j = 0; j < kMaxTopK; ++j) p.skip_gap[j] = (p.has_skip && j < args.top_k) ? args.skip_gap[j] : 0.0;
  p.keep = args.keep;
  return p;
}

}  // namespace cuda
}  // namespace moe_fast
