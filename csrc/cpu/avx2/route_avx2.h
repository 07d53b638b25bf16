// The AVX2 row kernel of Op 1 (route_avx2.cpp), as csrc/cpu/route.cpp calls it. Internal: the
// public entry points are cpu::route_rows and cpu::route_rows_at in moe_fast/kernels.h.
#pragma once
#include <cstdint>

#include "moe_fast/kernels.h"

namespace moe_fast {
namespace cpu {

// Whether this build compiled the AVX2 kernel (x86 with -mavx2 -mfma -mf16c; elsewhere a stub).
bool avx2_route_compiled();

// route_rows for tokens [t_begin, t_end), eight tokens per AVX2 register. Run it only on a CPU
// with AVX2, FMA and F16C. Returns false, writing nothing, for a case it leaves to the scalar
// code (fewer than k allowed experts); ids are those of the scalar code, weights within 2 ulps.
bool route_rows_avx2(DType dtype, const void* logits, const RouteArgs& args, int64_t t_begin, int64_t t_end,
                     float* weights, int32_t* ids);

}  // namespace cpu
}  // namespace moe_fast
