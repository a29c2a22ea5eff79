"""The error bound behind the GPU kernels' hardware cos/sin (`triton_math.rope_cos_sin(..., FAST=True)`).

Compiled kernels evaluate cos/sin with `cos.approx.f32` / `sin.approx.f32`, whose absolute error CUDA documents
only on [-pi, pi]: 2^-21.41 (sin) and 2^-21.19 (cos). The interpreter cannot run that PTX, so this checks the two
facts the bound rests on, with the kernels' own reduction run in the interpreter: the folded angle (FAST's input)
lies in [-pi, pi], and it is within ~2e-7 of the exact angle modulo 2 pi (float64), for positions up to 2^24 - 1
and the frequencies RoPE uses. Then |cos/sin error| <= 2^-21.19 + angle error < 1e-6 (cos and sin are 1-Lipschitz).
"""

import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from ctxext_kernels.ops import triton_math

HARDWARE_ERROR = 2.0 ** -21.19  # the larger of the two documented bounds (cos), on [-pi, pi]


@triton.jit
def _reduce_kernel(pos_ptr, inv_freq_ptr, out_ptr, n, BLOCK: tl.constexpr, FOLD: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    pos = tl.load(pos_ptr + offs, mask=mask, other=0)
    inv_freq = tl.load(inv_freq_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, triton_math.reduced_angle(pos, inv_freq, True, FOLD), mask=mask)


def _reduced(pos: torch.Tensor, inv_freq: torch.Tensor, fold: bool) -> torch.Tensor:
    out = torch.empty(pos.shape, dtype=torch.float32)
    _reduce_kernel[(triton.cdiv(pos.numel(), 4096),)](pos, inv_freq, out, pos.numel(), BLOCK=4096, FOLD=fold)
    return out


@pytest.fixture(scope="module")
def sweep():
    """Positions (the largest ones, where the first reduction's estimate is roughest, and random ones) x RoPE
    frequencies (theta 1e4 and 5e5 at head_dim 128, plus 1.0 exactly), flattened."""
    g = torch.Generator().manual_seed(0)
    pos = torch.cat([torch.arange(2**24 - 4096, 2**24), torch.randint(0, 2**24, (4096,), generator=g),
                     torch.arange(4096)])
    inv_freq = torch.cat([theta ** (-torch.arange(0, 128, 2, dtype=torch.float64) / 128) for theta in (1e4, 5e5)])
    inv_freq = torch.cat([inv_freq, torch.ones(1, dtype=torch.float64)]).to(torch.float32)
    pos, inv_freq = torch.broadcast_tensors(pos[:, None], inv_freq[None, :])
    return pos.reshape(-1).contiguous(), inv_freq.reshape(-1).contiguous()


def _exact(pos: torch.Tensor, inv_freq: torch.Tensor) -> np.ndarray:
    """pos * inv_freq (the fp32 frequency taken exactly) modulo 2 pi into [-pi, pi), in float64."""
    angle = pos.numpy().astype(np.float64) * inv_freq.numpy().astype(np.float64)  # exact: 24 x 24 bits
    return np.remainder(angle + math.pi, 2 * math.pi) - math.pi


def _distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(np.remainder(a - b + math.pi, 2 * math.pi) - math.pi)


def test_first_reduction_may_leave_the_hardware_range(sweep):
    """Why FAST folds: the precise path's angle (the C++ header's twin) exceeds pi by up to ~1 at large angles."""
    assert np.abs(_reduced(*sweep, fold=False).numpy()).max() > math.pi + 0.1


def test_folded_angle_is_in_range_and_exact(sweep):
    folded = _reduced(*sweep, fold=True).numpy().astype(np.float64)
    assert np.abs(folded).max() <= math.pi + 2e-7  # fp32(pi) itself is pi + 8.7e-8
    error = _distance(folded, _exact(*sweep)).max()
    assert error < 2.5e-7, error
    assert HARDWARE_ERROR + error < 1e-6


def test_fp32_cos_sin_on_the_reduced_range(sweep):
    """The interpreter's (numpy float32) cos/sin of the folded angle: within a few fp32 ulps plus the angle error
    of float64 cos/sin of the exact angle, the yardstick the hardware bound is added to."""
    folded = _reduced(*sweep, fold=True).numpy()
    exact = _exact(*sweep)
    for fn in (np.cos, np.sin):
        assert np.abs(fn(folded).astype(np.float64) - fn(exact)).max() < 3e-7
