"""The `@triton.jit` twin of csrc/include/ctxext/rope_math.h: exact RoPE angle, cos/sin and pair rotation.

Same constants, same operation order as the C++ header (see its comments for the error analysis), so the Triton and
CUDA kernels agree to the last bit on the angle.
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
def reduced_angle(pos, inv_freq, EXACT: tl.constexpr):
    """pos * inv_freq reduced to about [-pi, pi]; pos: integer tensor < 2^24, inv_freq: fp32 (broadcastable)."""
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
    return head + tail


@triton.jit
def rope_cos_sin(pos, inv_freq, scaling, EXACT: tl.constexpr, CONJUGATE: tl.constexpr):
    """(cos, sin) * scaling of the reduced angle; CONJUGATE negates the angle (backward)."""
    angle = reduced_angle(pos, inv_freq, EXACT)
    # On the reduced angle even an approximate cos/sin would stay within ~5e-7 absolute; Triton lowers these to
    # libdevice's precise __nv_cosf/__nv_sinf on NVIDIA, and the interpreter to numpy.
    cos = tl.cos(angle) * scaling
    sin = tl.sin(angle) * scaling
    if CONJUGATE:
        sin = -sin
    return cos, sin


@triton.jit
def rotate_pair(x1, x2, cos, sin):
    """(x1, x2) -> (x1*cos - x2*sin, x2*cos + x1*sin), in fp32."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin
