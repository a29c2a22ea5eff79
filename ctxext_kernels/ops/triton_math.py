"""The `@triton.jit` twin of csrc/include/ctxext/rope_math.h: exact RoPE angle, cos/sin and pair rotation.

Same constants, same operation order as the C++ header (see its comments for the error analysis), so the Triton and
CUDA kernels agree to the last bit on the angle.

`FAST` (compiled GPU kernels) evaluates cos/sin with the hardware approximations `cos.approx.f32`/`sin.approx.f32`
(MUFU, one instruction each) instead of libdevice's precise `__nv_cosf`/`__nv_sinf` (a Payne-Hanek branch and a stack
frame per element). That is safe only because the angle is already reduced exactly: CUDA documents the intrinsics'
absolute error on [-pi, pi] as 2^-21.41 (sin) and 2^-21.19 (cos), ~4.2e-7, so with the reduction's own ~1.2e-7 the
cos/sin stay within 1e-6 of float64. FAST folds the angle once more onto [-pi, pi] first (the first reduction's k
may be off by one turn for large angles, leaving up to ~pi + 1). The CPU interpreter cannot run inline PTX: there
FAST is off and numpy's precise cos/sin run (tests/test_triton_math.py checks the folded range and the error bound).
"""

import triton
import triton.language as tl

# 2*pi = TWO_PI_HI + TWO_PI_MID + TWO_PI_LO (fp32 pieces), and fp32(1 / 2*pi). Hex in rope_math.h. Module-level
# values reach compiled kernels only as `tl.constexpr(...)` instances (an annotation is not enough).
TWO_PI_HI = tl.constexpr(6.28318548202514648438)
TWO_PI_MID = tl.constexpr(-1.74845553146951715e-07)
TWO_PI_LO = tl.constexpr(-6.86049804002352749e-15)
INV_TWO_PI = tl.constexpr(0.159154936671257019043)


@triton.jit
def reduced_angle(pos, inv_freq, EXACT: tl.constexpr, FOLD: tl.constexpr = False):
    """pos * inv_freq reduced to about [-pi, pi]; pos: integer tensor < 2^24, inv_freq: fp32 (broadcastable).

    FOLD: one more exact turn off, so the result lies in [-pi, pi] up to rounding (the range of the fast cos/sin)."""
    x = pos.to(tl.float32)  # exact below 2^24
    hi = x * inv_freq
    if EXACT:
        lo = tl.fma(x, inv_freq, -hi)  # x * inv_freq == hi + lo exactly
    else:
        lo = tl.zeros_like(hi)
    k = tl.floor(tl.fma(hi, INV_TWO_PI, 0.5))
    head = tl.fma(-k, TWO_PI_HI, hi)  # exact
    tail = tl.fma(-k, TWO_PI_MID, lo)
    tail = tl.fma(-k, TWO_PI_LO, tail)
    if FOLD:
        # |head + tail| < pi + 1.1, so k is -1, 0 or 1; head - k * TWO_PI_HI is exact (Sterbenz), the tail's new
        # rounding is below 2^-40 and the one rounding of head + tail stays the only one that matters (~1.2e-7).
        k = tl.floor(tl.fma(head + tail, INV_TWO_PI, 0.5))
        head = tl.fma(-k, TWO_PI_HI, head)
        tail = tl.fma(-k, TWO_PI_MID, tail)
    return head + tail


@triton.jit
def _fast_cos(x):
    return tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _fast_sin(x):
    return tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def rope_cos_sin(pos, inv_freq, scaling, EXACT: tl.constexpr, CONJUGATE: tl.constexpr, FAST: tl.constexpr = False,
                 SCALED: tl.constexpr = True):
    """(cos, sin) * scaling of the reduced angle; CONJUGATE negates the angle (backward); FAST: hardware cos/sin;
    SCALED=False: scaling is 1 (skips two multiplies per element)."""
    angle = reduced_angle(pos, inv_freq, EXACT, FAST)
    if FAST:
        cos, sin = _fast_cos(angle), _fast_sin(angle)
    else:
        cos, sin = tl.cos(angle), tl.sin(angle)
    if SCALED:
        cos, sin = cos * scaling, sin * scaling
    if CONJUGATE:
        sin = -sin
    return cos, sin


@triton.jit
def rotate_pair(x1, x2, cos, sin):
    """(x1, x2) -> (x1*cos - x2*sin, x2*cos + x1*sin), in fp32."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin
