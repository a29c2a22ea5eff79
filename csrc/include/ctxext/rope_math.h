// Per-element RoPE math, shared by the CUDA kernels (device) and the host build (CPU, tested in CI).
// No torch, no CUDA runtime: only what a __host__ __device__ function may use.
//
// The angle of token position `pos` for frequency `inv_freq` is pos * inv_freq. Every peer rounds that product to
// fp32 once; at pos = 2^20 the rounding alone moves the angle by up to 2^-4 rad. Here the product is kept exactly as
// the unevaluated sum hi + lo (fma two-product) and reduced modulo 2*pi with a three-piece Cody-Waite constant, so the
// reduced angle is within ~1.5 fp32 ulps of the true value of pos * inv_freq (inv_freq taken as the exact fp32 value)
// for every pos < 2^24, and cos/sin of it within ~3e-7 of a float64 evaluation.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define CTXEXT_HD __host__ __device__ __forceinline__
#else
#define CTXEXT_HD inline
#endif

namespace ctxext {

// Positions must be exactly representable as fp32 integers for the two-product to be exact.
constexpr int64_t kMaxPosition = (int64_t{1} << 24) - 1;

// 2*pi = kTwoPiHi + kTwoPiMid + kTwoPiLo to ~2^-72 relative. kTwoPiHi is fp32(2*pi) itself: fma(-k, kTwoPiHi, hi) is
// exact because hi and k*kTwoPiHi are both multiples of ulp(kTwoPiHi) = 2^-21 (or of 2^-22 when hi < 4, where k <= 1)
// and the difference is below 4, i.e. fits in 24 bits.
constexpr float kTwoPiHi = 6.28318548202514648438f;        // 0x1.921fb6p+2
constexpr float kTwoPiMid = -1.74845553146951715e-07f;     // -0x1.777a5cp-23
constexpr float kTwoPiLo = -6.86049804002352749e-15f;      // -0x1.ee59dap-48
constexpr float kInvTwoPi = 0.159154936671257019043f;      // 0x1.45f306p-3

struct CosSin {
  float cos;
  float sin;
};

// Angle of `pos` at frequency `inv_freq`, reduced to about [-pi, pi].
// exact=true: from the exact product (our default). exact=false: from fp32(pos * inv_freq), the product every peer and
// transformers use, for bit-level parity with stock models (the reduction that follows is still exact).
CTXEXT_HD float reduced_angle(int64_t pos, float inv_freq, bool exact) {
  const float x = static_cast<float>(pos);            // exact: pos <= kMaxPosition
  const float hi = x * inv_freq;
  const float lo = exact ? fmaf(x, inv_freq, -hi) : 0.0f;  // x * inv_freq == hi + lo exactly
  // Any integer near hi / 2pi works; an off-by-one k only widens the range slightly.
  const float k = floorf(fmaf(hi, kInvTwoPi, 0.5f));
  const float head = fmaf(-k, kTwoPiHi, hi);          // exact, see kTwoPiHi
  float tail = fmaf(-k, kTwoPiMid, lo);                // k*kTwoPiMid exact inside the fma, one rounding
  tail = fmaf(-k, kTwoPiLo, tail);
  return head + tail;
}

// cos and sin of an angle reduced to about [-pi, pi]. kFastTrig selects the hardware approximations __cosf/__sinf
// (MUFU.COS/SIN, abs error <= 2^-21.41 ~ 3.6e-7 on [-pi, pi] per the CUDA programming guide) instead of the precise
// library functions: for kernels that round the rotated values to fp16/bf16 right away (2^-11 relative at best), where
// it cannot show, and the precise sinf/cosf costs a Payne-Hanek slow path with a local-memory array. The host build
// always evaluates the precise functions, so the CPU tests exercise everything but the device intrinsic itself.
// Never build with --use_fast_math instead: that would switch the fp32 RoPE op to the intrinsics too.
template <bool kFastTrig>
CTXEXT_HD CosSin reduced_cos_sin(float angle) {
#if defined(__CUDA_ARCH__)
  if constexpr (kFastTrig) return CosSin{__cosf(angle), __sinf(angle)};
#endif
  return CosSin{cosf(angle), sinf(angle)};
}

// cos and sin of the reduced angle, times the attention scaling (YaRN/LongRoPE temperature, 1 otherwise).
// conjugate=true negates the angle: the backward pass rotates gradients by -theta with the same kernel.
template <bool kFastTrig = false>
CTXEXT_HD CosSin rope_cos_sin(int64_t pos, float inv_freq, float scaling, bool exact, bool conjugate) {
  const CosSin cs = reduced_cos_sin<kFastTrig>(reduced_angle(pos, inv_freq, exact));
  return CosSin{cs.cos * scaling, (conjugate ? -cs.sin : cs.sin) * scaling};
}

// Rotate one pair (x1, x2) -> (x1*c - x2*s, x2*c + x1*s). The pair is (x[i], x[i + rotary_dim/2]) in the half-split
// (NeoX / transformers rotate_half) layout and (x[2i], x[2i+1]) in the interleaved (GPT-J) layout.
CTXEXT_HD void rotate_pair(float x1, float x2, CosSin cs, float* y1, float* y2) {
  *y1 = x1 * cs.cos - x2 * cs.sin;
  *y2 = x2 * cs.cos + x1 * cs.sin;
}

// Offsets of pair i inside one head, in elements, for either layout.
CTXEXT_HD void pair_offsets(int i, int rotary_dim, bool interleaved, int* first, int* second) {
  *first = interleaved ? 2 * i : i;
  *second = interleaved ? 2 * i + 1 : i + rotary_dim / 2;
}

}  // namespace ctxext
