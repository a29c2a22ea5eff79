"""The math header and the kernel's work items, compiled for the host (ctxext_kernels._C), against float64 written here.

`_C.host_cos_sin` evaluates `rope_cos_sin` of csrc/include/ctxext/rope_math.h exactly as the CUDA kernel does;
`cuda_ext.rope_forward` on CPU tensors runs the kernel's items (csrc/include/ctxext/rope_tile.h) on the host.
"""

import importlib
import os

import numpy as np
import pytest
import torch

try:
    _C = importlib.import_module("ctxext_kernels._C")
except ImportError as exc:
    if os.environ.get("CTXEXT_REQUIRE_HOST_BUILD") == "1":
        raise
    pytest.skip(f"ctxext_kernels._C is not built ({exc}); reinstall with a C++ compiler", allow_module_level=True)

from ctxext_kernels.ops import cuda_ext  # noqa: E402

MAX_POSITION = 2**24 - 1


def _frequencies() -> np.ndarray:
    """fp32 inv_freq of common rope thetas and head dims, plus random ones over the whole useful range."""
    tables = [1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
              for theta, dim in ((10_000.0, 128), (500_000.0, 128), (100_000.0, 64), (1_000_000.0, 80))]
    rng = np.random.default_rng(0)
    tables.append(10.0 ** rng.uniform(-7.0, 0.0, 200))
    return np.concatenate(tables).astype(np.float32)


def _positions() -> np.ndarray:
    """Edges (powers of two and their neighbours, the largest position) and random positions up to 2^24 - 1."""
    edges = [0, 1, 2, 3, MAX_POSITION, MAX_POSITION - 1]
    for e in range(4, 25):
        edges += [2**e - 1, 2**e, 2**e + 1]
    rng = np.random.default_rng(1)
    return np.unique(np.clip(np.concatenate([edges, rng.integers(0, 2**24, 400)]), 0, MAX_POSITION)).astype(np.int64)


def _float64_cos_sin(positions: np.ndarray, inv_freq: np.ndarray, scaling: float):
    # position * inv_freq is exact in float64 (24-bit integer times 24-bit mantissa), and numpy's cos/sin reduce
    # large float64 arguments correctly: this is the true cos/sin of the fp32 inv_freq's angle.
    angle = positions.astype(np.float64)[:, None] * inv_freq.astype(np.float64)[None, :]
    return scaling * np.cos(angle), scaling * np.sin(angle)


@pytest.mark.parametrize("scaling", [1.0, 1.2079441541679836])
def test_exact_angle_within_1e6_everywhere(scaling):
    positions, inv_freq = _positions(), _frequencies()
    cos, sin = _C.host_cos_sin(positions, inv_freq, scaling, True, False)
    want_cos, want_sin = _float64_cos_sin(positions, inv_freq, scaling)
    worst = max(np.abs(cos - want_cos).max(), np.abs(sin - want_sin).max())
    assert worst < 1e-6 * scaling, f"exact mode: worst |error| {worst:.3g} over {cos.size} (position, freq) pairs"


def test_fp32_product_is_measurably_worse_at_large_positions():
    # The plain fp32 product (transformers' parity mode) is off by far more than 1e-3 at large positions: this is
    # what the exact mode fixes, and it shows the comparison above can fail.
    positions, inv_freq = _positions(), _frequencies()
    large = positions[positions >= 2**20]
    cos, sin = _C.host_cos_sin(large, inv_freq, 1.0, False, False)
    want_cos, want_sin = _float64_cos_sin(large, inv_freq, 1.0)
    assert max(np.abs(cos - want_cos).max(), np.abs(sin - want_sin).max()) > 1e-3
    small = positions[positions < 2**10]  # the product's rounding error is below ulp(1024) / 2 = 2^-14 here
    cos, sin = _C.host_cos_sin(small, inv_freq, 1.0, False, False)
    want_cos, want_sin = _float64_cos_sin(small, inv_freq, 1.0)
    assert max(np.abs(cos - want_cos).max(), np.abs(sin - want_sin).max()) < 2**-14


def test_conjugate_negates_sin_only():
    positions, inv_freq = _positions()[:50], _frequencies()[:50]
    cos, sin = _C.host_cos_sin(positions, inv_freq, 1.0, True, False)
    cos_c, sin_c = _C.host_cos_sin(positions, inv_freq, 1.0, True, True)
    np.testing.assert_array_equal(cos_c, cos)
    np.testing.assert_array_equal(sin_c, -sin)


def test_position_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="positions"):
        _C.host_cos_sin(np.array([2**24]), np.ones(1, np.float32))


def _rotate(q, positions, inv_freq, scaling=1.0, q_out=None):
    q_out = torch.empty_like(q) if q_out is None else q_out
    cuda_ext.rope_forward(q, None, q_out, None, positions, inv_freq, scaling, False, False, True)
    return q_out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_rounding_matches_torch(dtype):
    # At position 0 the rotation is a multiplication by `scaling` in fp32 followed by one rounding to the dtype: the
    # header's host conversions must round exactly like torch (nearest even, subnormals, overflow to inf). Inputs
    # stay finite (an infinite x2 would give inf * sin(0) = nan in any rotation), outputs near 65504 overflow.
    g = torch.Generator().manual_seed(0)
    magnitudes = torch.logspace(-30, np.log10(60000.0), 4000, dtype=torch.float64).float()
    x = magnitudes * torch.where(torch.rand(magnitudes.shape, generator=g) < 0.5, -1.0, 1.0)
    q = x.to(dtype).reshape(1, 1, -1, 8)
    scaling = 1.3711
    out = _rotate(q, torch.zeros(1, 1, dtype=torch.int64), torch.full((4,), 0.5), scaling)
    torch.testing.assert_close(out, (q.float() * scaling).to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_finite_value_round_trips(dtype):
    # Rotation by angle 0 with scaling 1 is the identity: all 2^16 bit patterns (but inf/nan, which would spill into
    # their pair partner through inf * sin(0)) must come back unchanged through the host load/store conversions.
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    q = every[torch.isfinite(every)].reshape(1, 1, -1, 8)  # 63488 (fp16) and 65280 (bf16) values
    out = _rotate(q, torch.zeros(1, 1, dtype=torch.int64), torch.ones(4))
    torch.testing.assert_close(out, q, rtol=0, atol=0)


def test_vectorized_and_scalar_paths_agree():
    # Same rows, once 16-byte aligned (vector loads) and once shifted by one element (scalar fallback).
    g = torch.Generator().manual_seed(0)
    aligned = torch.randn(2, 5, 4, 64, generator=g).to(torch.bfloat16)
    shifted = torch.empty(aligned.numel() + 1, dtype=torch.bfloat16)[1:].view(aligned.shape)
    shifted.copy_(aligned)
    assert aligned.data_ptr() % 16 == 0 and shifted.data_ptr() % 16 != 0
    positions = torch.randint(0, 2**20, (2, 5), generator=g)
    inv_freq = 1.0 / 10_000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    torch.testing.assert_close(_rotate(shifted, positions, inv_freq), _rotate(aligned, positions, inv_freq),
                               rtol=0, atol=0)


def test_empty_batch_is_a_no_op():
    q, k = torch.empty(0, 3, 4, 16), torch.empty(0, 3, 2, 16)
    cuda_ext.rope_forward(q, k, torch.empty_like(q), torch.empty_like(k), torch.empty(0, 3, dtype=torch.int32),
                          torch.ones(4), 1.0, False, False, True)


_Q = torch.randn(2, 3, 4, 16)
_POSITIONS = torch.zeros(2, 3, dtype=torch.int64)
_INV_FREQ = torch.ones(4)


@pytest.mark.parametrize("q, q_out, positions, inv_freq, message", [
    (_Q[..., ::2], None, _POSITIONS, _INV_FREQ, "q: last dimension must be contiguous \\(stride 1\\), got stride 2"),
    (_Q, torch.empty(2, 3, 4, 8), _POSITIONS, _INV_FREQ, "q_out: shape \\[2, 3, 4, 8\\] must equal q's shape"),
    (_Q, _Q.transpose(0, 1), _POSITIONS, _INV_FREQ, "q_out: shape"),
    (_Q, _Q.as_strided(_Q.shape, (48, 16, 4, 1)), _POSITIONS, _INV_FREQ,
     "q_out: shares q's data pointer with different strides"),
    (_Q, None, _POSITIONS, torch.ones(9), "inv_freq: rotary_dim = 2 \\* 9 = 18 exceeds the head dim 16"),
    (_Q, None, _POSITIONS.T, _INV_FREQ, "positions: shape must be \\[B, S\\] = \\[2, 3\\], got \\[3, 2\\]"),
])
def test_argument_errors_name_the_argument(q, q_out, positions, inv_freq, message):
    with pytest.raises(ValueError, match=message):
        _rotate(q, positions, inv_freq, q_out=q_out)


# --- The host build of the kernel against a float64 rotation, over a curated list of launches ---------------------

def _float64_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
                  interleaved: bool) -> torch.Tensor:
    """x `[B, S, H, D]` rotated in float64 (real arithmetic, pairs picked by index); dims >= rotary_dim unchanged."""
    x = x.to(torch.float64).clone()
    pairs = inv_freq.numel()
    first = torch.arange(pairs) * 2 if interleaved else torch.arange(pairs)
    second = first + 1 if interleaved else first + pairs
    angle = positions.to(torch.float64)[:, :, None, None] * inv_freq.to(torch.float64)  # [B, S, 1, pairs]
    cos, sin = scaling * torch.cos(angle), scaling * torch.sin(angle)
    x1, x2 = x[..., first], x[..., second]
    x[..., first], x[..., second] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    return x


# Rounding of a value computed in fp32 to the dtype: half an ulp relative. Plus the fp32 arithmetic itself (angle error
# ~3e-7 on cos/sin, two products and a sum): ~2e-6 times the pair's magnitude.
_ROUNDING = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
_FP32_ARITHMETIC = 2e-6


def _assert_within_rounding(actual: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, scaling: float,
                            what: str) -> None:
    bound = _ROUNDING[actual.dtype] * expected.abs() + _FP32_ARITHMETIC * scaling * x.to(torch.float64).abs().amax(-1,
                                                                                                                 True)
    excess = (actual.to(torch.float64) - expected).abs() - bound
    worst = int(excess.argmax())
    assert excess.max() <= 0, (f"{what}: element {np.unravel_index(worst, excess.shape)} off by "
                               f"{float(excess.flatten()[worst] + bound.flatten()[worst]):.3g}, "
                               f"bound {float(bound.flatten()[worst]):.3g}")


def _heads_view(batch, seq, heads, head_dim, dtype, storage, generator):
    """A `[B, S, H, D]` view with the given storage: contiguous, "bhsd" (transformers' transposed [B, H, S, D]),
    "padded" (rows of a wider buffer), "shifted" (one element off 16-byte alignment: the scalar path)."""
    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)
    if storage == "contiguous":
        return randn(batch, seq, heads, head_dim)
    if storage == "bhsd":
        return randn(batch, heads, seq, head_dim).transpose(1, 2)
    if storage == "padded":
        return randn(batch, seq, heads + 1, head_dim + 8)[:, :, 1:, :head_dim]
    if storage == "shifted":
        flat = randn(batch * seq * heads * head_dim + 1)[1:]
        return flat.view(batch, seq, heads, head_dim)
    raise ValueError(storage)


def _positions_view(batch, seq, dtype, storage, generator, largest=MAX_POSITION):
    """`[B, S]` positions: "random" contiguous, "shared" (one row expanded, stride 0 along B), "transposed" strides."""
    if storage == "shared":
        return torch.randint(0, largest + 1, (seq,), generator=generator, dtype=dtype).expand(batch, seq)
    positions = torch.randint(0, largest + 1, (batch, seq), generator=generator, dtype=dtype)
    return positions.T.contiguous().T if storage == "transposed" else positions


# (dtype, head_dim, rotary_dim, q heads, k heads, interleaved, q/k storage, positions dtype and storage, scaling, why)
HOST_CASES = [
    (torch.float32, 64, 64, 9, 3, False, "contiguous", torch.int64, "random", 1.0, "smollm2 gqa fp32"),
    (torch.bfloat16, 128, 128, 8, 2, False, "bhsd", torch.int64, "shared", 1.0, "llama bhsd views, shared positions"),
    (torch.float16, 128, 128, 4, 1, True, "contiguous", torch.int32, "transposed", 1.0, "interleaved mqa int32"),
    (torch.bfloat16, 80, 64, 4, 4, False, "padded", torch.int64, "random", 1.2079, "partial rotary, yarn scaling"),
    (torch.float16, 96, 32, 3, 1, True, "padded", torch.int32, "random", 1.0, "partial interleaved"),
    (torch.float32, 256, 256, 2, 2, False, "shifted", torch.int64, "random", 0.7, "misaligned fp32 scalar path"),
    (torch.bfloat16, 64, 48, 5, 5, True, "shifted", torch.int32, "shared", 1.0, "misaligned partial interleaved"),
    (torch.float16, 72, 72, 2, 1, False, "contiguous", torch.int64, "random", 1.0, "rotary/2 not a vector multiple"),
]


def _case_inputs(case, batch=2, seq=5):
    dtype, head_dim, rotary_dim, q_heads, k_heads, interleaved, storage, pos_dtype, pos_storage, scaling, _ = case
    g = torch.Generator().manual_seed(head_dim * 31 + q_heads)
    q = _heads_view(batch, seq, q_heads, head_dim, dtype, storage, g)
    k = _heads_view(batch, seq, k_heads, head_dim, dtype, storage, g)
    positions = _positions_view(batch, seq, pos_dtype, pos_storage, g)
    theta = torch.tensor(10_000.0, dtype=torch.float64)
    inv_freq = (1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)).float()
    return q, k, positions, inv_freq, scaling, interleaved


@pytest.mark.parametrize("case", HOST_CASES, ids=lambda c: c[-1])
def test_host_loop_out_of_place_matches_float64(case):
    q, k, positions, inv_freq, scaling, interleaved = _case_inputs(case)
    # Outputs start as NaN: every element, tail included, must be written.
    q_out, k_out = torch.full_like(q, float("nan")), torch.full_like(k, float("nan"))
    q_before, k_before = q.clone(), k.clone()
    cuda_ext.rope_forward(q, k, q_out, k_out, positions, inv_freq, scaling, interleaved, False, True)
    for name, x, out in (("q", q, q_out), ("k", k, k_out)):
        expected = _float64_rope(x, positions, inv_freq, scaling, interleaved)
        _assert_within_rounding(out, expected, x, scaling, name)
        rotary_dim = 2 * inv_freq.numel()
        assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:]), f"{name}: tail not copied bit for bit"
    assert torch.equal(q, q_before) and torch.equal(k, k_before), "inputs modified by an out-of-place launch"


@pytest.mark.parametrize("case", HOST_CASES, ids=lambda c: c[-1])
def test_host_loop_in_place_matches_float64(case):
    q, k, positions, inv_freq, scaling, interleaved = _case_inputs(case)
    q_before, k_before = q.clone(), k.clone()
    cuda_ext.rope_forward(q, k, q, k, positions, inv_freq, scaling, interleaved, False, True)
    for name, x, before in (("q", q, q_before), ("k", k, k_before)):
        _assert_within_rounding(x, _float64_rope(before, positions, inv_freq, scaling, interleaved), before, scaling,
                                name)
        rotary_dim = 2 * inv_freq.numel()
        assert torch.equal(x[..., rotary_dim:], before[..., rotary_dim:]), f"{name}: tail touched in place"


@pytest.mark.parametrize("case", [c for c in HOST_CASES if c[0] == torch.float32], ids=lambda c: c[-1])
def test_conjugate_undoes_the_rotation(case):
    # R(-theta) R(theta) = identity; with scaling s the round trip multiplies by s^2.
    q, k, positions, inv_freq, scaling, interleaved = _case_inputs(case)
    q_rot, k_rot = torch.empty_like(q), torch.empty_like(k)
    cuda_ext.rope_forward(q, k, q_rot, k_rot, positions, inv_freq, scaling, interleaved, False, True)
    cuda_ext.rope_forward(q_rot, k_rot, q_rot, k_rot, positions, inv_freq, 1.0 / scaling, interleaved, True, True)
    torch.testing.assert_close(q_rot, q, rtol=0, atol=4e-6 * float(q.abs().max()))
    torch.testing.assert_close(k_rot, k, rtol=0, atol=4e-6 * float(k.abs().max()))


def test_decode_single_token_and_q_only():
    # One token (the decode step), no k: the launch with the fewest items.
    q, _, positions, inv_freq, scaling, interleaved = _case_inputs(HOST_CASES[1], batch=1, seq=1)
    q_out = torch.empty_like(q)
    cuda_ext.rope_forward(q, None, q_out, None, positions, inv_freq, scaling, interleaved, False, True)
    _assert_within_rounding(q_out, _float64_rope(q, positions, inv_freq, scaling, interleaved), q, scaling, "q")
