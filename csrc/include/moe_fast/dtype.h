// Storage types the kernels read, and their conversion to float.
// Plain C++ (host and device): no torch header, so nvcc can compile it against a CPU-only torch.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MOE_FAST_HD __host__ __device__ __forceinline__
#else
#define MOE_FAST_HD inline
#endif

namespace moe_fast {

// Element type of an input buffer. The values match nothing in torch on purpose: bindings map.
enum class DType : int32_t { Float32 = 0, BFloat16 = 1, Float16 = 2 };

// 16-bit storage wrappers; only their bits matter.
struct bf16_t { uint16_t bits; };
struct fp16_t { uint16_t bits; };

MOE_FAST_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

MOE_FAST_HD float to_float(float x) { return x; }
MOE_FAST_HD float to_float(bf16_t x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }

// IEEE binary16 -> binary32, exact for every input (subnormals, inf, NaN).
MOE_FAST_HD float to_float(fp16_t x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  if (exp == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (mant << 13));  // inf / NaN
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_to_float(sign);  // signed zero
  // Subnormal half: normalize into a float32 normal.
  int32_t e = -1;
  do {
    ++e;
    mant <<= 1;
  } while ((mant & 0x400u) == 0);
  return bits_to_float(sign | (static_cast<uint32_t>(112 - e) << 23) | ((mant & 0x3FFu) << 13));
}

}  // namespace moe_fast

// Compile-time dispatch, written once for every kernel (macros, so that they add no function a
// translation unit built with other instruction flags could share: see csrc/cpu/avx2/).
// MOE_FAST_DISPATCH_DTYPE runs the statements with `scalar_t` bound to DTYPE's storage type, and
// OTHERWISE for a value outside the enum; MOE_FAST_DISPATCH_TOP_K runs them with `constexpr int K`
// bound to K_VALUE (1..8, route's limit in rules.h), and OTHERWISE for any other value.
#define MOE_FAST_DISPATCH_DTYPE(DTYPE, OTHERWISE, ...)                  \
  switch (DTYPE) {                                                      \
    case ::moe_fast::DType::Float32: {                                  \
      using scalar_t = float;                                           \
      __VA_ARGS__;                                                      \
    } break;                                                            \
    case ::moe_fast::DType::BFloat16: {                                 \
      using scalar_t = ::moe_fast::bf16_t;                              \
      __VA_ARGS__;                                                      \
    } break;                                                            \
    case ::moe_fast::DType::Float16: {                                  \
      using scalar_t = ::moe_fast::fp16_t;                              \
      __VA_ARGS__;                                                      \
    } break;                                                            \
    default:                                                            \
      OTHERWISE;                                                        \
  }

#define MOE_FAST_TOP_K_CASE_(KV, ...) \
  case KV: {                          \
    constexpr int K = KV;             \
    __VA_ARGS__;                      \
  } break;

#define MOE_FAST_DISPATCH_TOP_K(K_VALUE, OTHERWISE, ...) \
  switch (K_VALUE) {                                     \
    MOE_FAST_TOP_K_CASE_(1, __VA_ARGS__)                 \
    MOE_FAST_TOP_K_CASE_(2, __VA_ARGS__)                 \
    MOE_FAST_TOP_K_CASE_(3, __VA_ARGS__)                 \
    MOE_FAST_TOP_K_CASE_(4, __VA_ARGS__)                 \
    MOE_FAST_TOP_K_CASE_(5, __VA_ARGS__)                 \
    MOE_FAST_TOP_K_CASE_(6, __VA_ARGS__)                 \
    MOE_FAST_TOP_K_CASE_(7, __VA_ARGS__)                 \
    MOE_FAST_TOP_K_CASE_(8, __VA_ARGS__)                 \
    default:                                             \
      OTHERWISE;                                         \
  }
