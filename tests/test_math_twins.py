"""The C++ math header and its Triton twin must use the same constants (the angles of both backends agree bitwise)."""

import re
from pathlib import Path

import numpy as np

from ctxext_kernels.ops import triton_math

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "include" / "ctxext" / "rope_math.h"
NAMES = {"kTwoPiHi": "TWO_PI_HI", "kTwoPiMid": "TWO_PI_MID", "kTwoPiLo": "TWO_PI_LO", "kInvTwoPi": "INV_TWO_PI"}


def _header_constants() -> dict[str, tuple[float, float]]:
    """name -> (decimal literal, hex in the trailing comment), both as fp32."""
    found = {}
    for name, decimal, hexa in re.findall(r"constexpr float (\w+) = ([-0-9.e+]+)f;\s*// (-?0x[0-9a-f.p+-]+)",
                                          HEADER.read_text()):
        found[name] = (np.float32(float(decimal)), np.float32(float.fromhex(hexa)))
    return found


def test_header_literals_match_their_hex():
    constants = _header_constants()
    assert set(constants) == set(NAMES)
    for name, (decimal, hexa) in constants.items():
        assert decimal == hexa, name


def test_triton_constants_equal_the_header():
    for cpp_name, (value, _) in _header_constants().items():
        triton_value = getattr(triton_math, NAMES[cpp_name])
        triton_value = getattr(triton_value, "value", triton_value)
        assert np.float32(triton_value) == value, cpp_name


def test_two_pi_pieces_sum_to_two_pi():
    import mpmath

    mpmath.mp.prec = 120
    pieces = [mpmath.mpf(float(v)) for v, _ in (_header_constants()[n] for n in ("kTwoPiHi", "kTwoPiMid", "kTwoPiLo"))]
    assert abs(sum(pieces) - 2 * mpmath.pi) < mpmath.mpf(2) ** -68
