// Storage types for the three element types and their conversions to and from fp32, the same on host and device.
// Half and BFloat16 are plain 16-bit containers so that one kernel template (and its host build) works without the CUDA
// headers; on the device the conversions are the CUDA intrinsics, on the host the same round-to-nearest-even in bits
// (matching torch's CPU conversions, so the host build is an exact stand-in for the kernel).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "ctxext/rope_math.h"  // CTXEXT_HD

namespace ctxext {

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

// The dtype tag the Python side passes (values are part of the binding's contract).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

namespace detail {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in fp32
    return bits_float(sign | float_bits(static_cast<float>(mantissa) * 5.9604644775390625e-8f));
  }
  if (exponent == 31) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf / nan
  return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));          // rebias 15 -> 127
}

inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t magnitude = x & 0x7fffffffu;
  if (magnitude >= 0x7f800000u) return static_cast<uint16_t>(sign | (magnitude > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (magnitude >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (magnitude < 0x38800000u) {
    // Below 2^-14 the result is a half subnormal (unit 2^-24). Adding 0.5f puts the unit at fp32's last mantissa bit,
    // so the fp32 addition itself rounds to nearest even; the low bits are then the half's mantissa.
    const float shifted = bits_float(magnitude) + 0.5f;
    return static_cast<uint16_t>(sign | (float_bits(shifted) - 0x3f000000u));
  }
  magnitude += 0xfffu + ((magnitude >> 13) & 1u);  // round to nearest even on the 13 dropped bits
  return static_cast<uint16_t>(sign | ((magnitude - (112u << 23)) >> 13));
}

inline uint16_t float_to_bfloat16_bits(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet nan
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);               // round to nearest even
}

}  // namespace detail

CTXEXT_HD float to_float(float x) { return x; }

CTXEXT_HD float to_float(Half x) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(x.bits));
#else
  return detail::half_bits_to_float(x.bits);
#endif
}

CTXEXT_HD float to_float(BFloat16 x) {
#if defined(__CUDA_ARCH__)
  return __bfloat162float(__ushort_as_bfloat16(x.bits));
#else
  return detail::bits_float(static_cast<uint32_t>(x.bits) << 16);
#endif
}

template <typename T>
CTXEXT_HD T from_float(float x);

template <>
CTXEXT_HD float from_float<float>(float x) {
  return x;
}

template <>
CTXEXT_HD Half from_float<Half>(float x) {
#if defined(__CUDA_ARCH__)
  return Half{__half_as_ushort(__float2half_rn(x))};
#else
  return Half{detail::float_to_half_bits(x)};
#endif
}

template <>
CTXEXT_HD BFloat16 from_float<BFloat16>(float x) {
#if defined(__CUDA_ARCH__)
  return BFloat16{__bfloat16_as_ushort(__float2bfloat16_rn(x))};
#else
  return BFloat16{detail::float_to_bfloat16_bits(x)};
#endif
}

}  // namespace ctxext
