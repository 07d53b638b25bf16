// Which CPU instruction level the route kernel runs at: what the build and the CPU support,
// capped by the environment (kernels.h, CpuLevel). Baseline x86-64 code: it runs on every CPU.
#include <cstdlib>
#include <cstring>

#include "avx2/route_avx2.h"
#include "moe_fast/kernels.h"

namespace moe_fast {
namespace cpu {
namespace {

// AVX2, FMA and F16C, and an OS that saves the ymm registers (libgcc's test includes XGETBV).
bool cpu_has_avx2() {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

CpuLevel level_from_environment() {
  const char* want = std::getenv("MOE_FAST_CPU_CAPABILITY");
  if (want == nullptr || *want == '\0') want = std::getenv("ATEN_CPU_CAPABILITY");
  if (want != nullptr && std::strcmp(want, "default") == 0) return CpuLevel::Default;
  return cpu_level_supported(CpuLevel::Avx2) ? CpuLevel::Avx2 : CpuLevel::Default;
}

}  // namespace

bool cpu_level_supported(CpuLevel level) {
  static const bool avx2 = avx2_route_compiled() && cpu_has_avx2();
  return level == CpuLevel::Default || (level == CpuLevel::Avx2 && avx2);
}

CpuLevel route_cpu_level() {
  static const CpuLevel level = level_from_environment();
  return level;
}

const char* cpu_level_name(CpuLevel level) { return level == CpuLevel::Avx2 ? "avx2" : "default"; }

}  // namespace cpu
}  // namespace moe_fast
