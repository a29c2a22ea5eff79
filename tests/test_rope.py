"""The fused RoPE op against the float64 oracle, for every backend, over a curated list of cases.

Backends, each on the device it runs on (`BACKENDS`): "torch" (the reference) and "triton" (its CPU interpreter) and
"cpu" (host build of the CUDA code's per-element math) on CPU tensors; "triton" and "cuda" on CUDA tensors, marked
`gpu` (they skip without a GPU; `pytest -m gpu` selects them). The list of cases is deliberate, not a cross product:
each case exists for one reason, named in `why`.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from oracles import TOLERANCES, assert_close_to_oracle, rope_oracle

import ctxext_kernels as ck
from ctxext_kernels.ops.spec import RopeSpec


@dataclasses.dataclass(frozen=True)
class Case:
    why: str
    head_dim: int = 64
    q_heads: int = 4
    k_heads: int = 2
    batch: int = 2
    seq: int = 6
    layout: str = "bhsd"
    dtype: torch.dtype = torch.float32
    rope: tuple = ("default", {})  # (rope_type, scaling params)
    partial: float = 1.0
    interleaved: bool = False
    max_position: int | None = None  # None: 0..S-1; else random ids below it
    pos_dtype: torch.dtype = torch.int64
    shared_positions: bool = False  # 1-D [S] ids shared by the batch
    strided: bool = False  # q/k as views into a fused qkv projection (transformers' pattern)
    packed: tuple | None = None  # "thd": sequence lengths; ids restart per sequence

    def __str__(self):
        return self.why.replace(" ", "-")


CASES = [
    Case("llama gqa bf16", head_dim=128, dtype=torch.bfloat16),
    Case("mqa fp16 bshd", q_heads=3, k_heads=1, layout="bshd", dtype=torch.float16, max_position=2**16),
    Case("partial rotary head 80", head_dim=80, partial=0.5, max_position=4096),
    Case("interleaved head 96", head_dim=96, interleaved=True, layout="bshd", max_position=1000),
    Case("head 256 bf16", head_dim=256, q_heads=2, k_heads=2, dtype=torch.bfloat16, max_position=8192),
    Case("varlen packed fp16", layout="thd", dtype=torch.float16, packed=(5, 1, 6)),
    Case("pose jumps packed bf16", head_dim=128, layout="thd", dtype=torch.bfloat16, packed=(7, 5), max_position=2**15),
    Case("strided fused qkv", strided=True, max_position=3000),
    Case("positions to 2^20", head_dim=128, max_position=2**20),
    Case("positions near 2^24", max_position=2**24),
    Case("int32 shared ids fp16", batch=3, dtype=torch.float16, pos_dtype=torch.int32, shared_positions=True,
         max_position=50000),
    Case("yarn temperature", rope=("yarn", {"factor": 8.0, "original_max_position_embeddings": 512}),
         max_position=16384),
    Case("dynamic ntk beyond window bf16", rope=("dynamic", {"factor": 4.0}), dtype=torch.bfloat16, max_position=9000),
    Case("longrope long factors", rope=("longrope", {"short_factor": [1.0] * 32,
                                                  "long_factor": [1.0 + i / 8 for i in range(32)],
                                                  "original_max_position_embeddings": 256}), max_position=6000),
    Case("llama3 interleaved partial bf16", rope=("llama3", {"factor": 8.0, "low_freq_factor": 1.0,
                                                            "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 512}),
         interleaved=True, partial=0.5, dtype=torch.bfloat16, max_position=2**18),
    Case("decode token", head_dim=128, batch=1, seq=1, dtype=torch.bfloat16, max_position=100000),
]

def _on_gpu(backend: str):
    return pytest.param(backend, "cuda", id=f"{backend}-gpu", marks=pytest.mark.gpu)


# (backend, device of the tensors): Triton runs on both, in its interpreter on the CPU and compiled on the GPU
BACKENDS = [pytest.param("torch", "cpu", id="torch"), pytest.param("triton", "cpu", id="triton-interpreter"),
            pytest.param("cpu", "cpu", id="cpu"), _on_gpu("triton"), _on_gpu("cuda")]


def _require(backend: str, device: str) -> None:
    """Skip when `backend` cannot run on `device` here (tests/conftest.py skips `gpu` tests without a GPU, and fails
    them on the GPU run instead of skipping); the host build is mandatory where CTXEXT_REQUIRE_HOST_BUILD=1 (CI)."""
    usable, reason = ck.backends(device)[backend]
    if not usable:
        if backend == "cpu" and os.environ.get("CTXEXT_REQUIRE_HOST_BUILD") == "1":
            pytest.fail(f"the host build is required here but unusable: {reason}")
        pytest.skip(reason)


def _spec(case: Case, device) -> RopeSpec:
    rope_type, scaling = case.rope
    return RopeSpec.from_params(case.head_dim, 10000.0, rope_type, max_position_embeddings=2048,
                                partial_rotary_factor=case.partial, device=device, **scaling)


def _canonical(x: torch.Tensor, layout: str) -> torch.Tensor:
    """`[B, S, H, D]` view of a tensor in `layout`."""
    return {"bhsd": lambda t: t.transpose(1, 2), "bshd": lambda t: t, "thd": lambda t: t[None]}[layout](x)


def _make_inputs(case: Case, device, seed: int = 0):
    """q, k in the case's layout, position_ids as passed to apply_rope, cu_seqlens, and positions `[B, S]`."""
    g = torch.Generator().manual_seed(seed)
    batch, seq = (1, sum(case.packed)) if case.packed else (case.batch, case.seq)
    heads = case.q_heads + case.k_heads
    if case.strided:  # one projection output, q and k sliced out of it and viewed as heads: nothing contiguous
        # made on the target device: moving a view there would copy it into a contiguous tensor
        qkv = torch.randn(batch, seq, (heads + case.k_heads) * case.head_dim, generator=g).to(device)
        q = qkv[..., : case.q_heads * case.head_dim].view(batch, seq, case.q_heads, case.head_dim)
        k = qkv[..., case.q_heads * case.head_dim: heads * case.head_dim].view(batch, seq, case.k_heads, case.head_dim)
    else:
        q = torch.randn(batch, seq, case.q_heads, case.head_dim, generator=g)
        k = torch.randn(batch, seq, case.k_heads, case.head_dim, generator=g)
    to_layout = {"bhsd": lambda t: t.transpose(1, 2), "bshd": lambda t: t, "thd": lambda t: t[0]}[case.layout]
    if not case.strided:
        to_layout = {"bhsd": lambda t: t.transpose(1, 2).contiguous(), "bshd": lambda t: t,
                     "thd": lambda t: t[0]}[case.layout]
    q, k = (to_layout(t.to(case.dtype)).to(device) for t in (q, k))

    cu_seqlens = None
    if case.packed:
        cu_seqlens = torch.tensor([0, *torch.tensor(case.packed).cumsum(0).tolist()], device=device)
        if case.max_position is None:
            restarts = torch.cat([torch.arange(n) for n in case.packed])
            return q, k, None, cu_seqlens, restarts[None].to(device)
        # PoSE-style: increasing ids with random skips inside each packed sequence
        ids = torch.cat([torch.randperm(case.max_position, generator=g)[:n].sort().values for n in case.packed])
        return q, k, ids.to(case.pos_dtype).to(device), cu_seqlens, ids[None].to(device)
    if case.max_position is None:
        ids = torch.arange(seq).expand(batch, seq)
    else:
        ids = torch.randint(0, case.max_position, (1 if case.shared_positions else batch, seq), generator=g)
        ids = ids.expand(batch, seq)
    passed = ids[0] if case.shared_positions else ids
    return q, k, passed.to(case.pos_dtype).to(device), cu_seqlens, ids.to(device)


def _expected(case, spec, q, k, positions):
    inv_freq = spec.inv_freq_for(int(positions.max()) + 1).cpu()
    return (rope_oracle(_canonical(x, case.layout).cpu(), positions.cpu(), inv_freq, spec.attention_scaling,
                        case.interleaved) for x in (q, k))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_matches_float64(case, backend, device):
    _require(backend, device)
    spec = _spec(case, device)
    q, k, position_ids, cu_seqlens, positions = _make_inputs(case, device)
    q_before, k_before = q.clone(), k.clone()
    q_rot, k_rot = ck.apply_rope(q, k, position_ids, spec, layout=case.layout, interleaved=case.interleaved,
                                 cu_seqlens=cu_seqlens, backend=backend)
    assert q_rot.shape == q.shape and k_rot.shape == k.shape and q_rot.dtype == case.dtype
    q_exp, k_exp = _expected(case, spec, q, k, positions)
    assert_close_to_oracle(_canonical(q_rot, case.layout).cpu(), q_exp, case.dtype, "q")
    assert_close_to_oracle(_canonical(k_rot, case.layout).cpu(), k_exp, case.dtype, "k")
    assert torch.equal(q, q_before) and torch.equal(k, k_before), "out-of-place call modified its inputs"


INPLACE_CASES = [c for c in CASES if c.why in ("llama gqa bf16", "partial rotary head 80", "strided fused qkv",
                                                "varlen packed fp16")]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", INPLACE_CASES, ids=str)
def test_inplace_matches_float64(case, backend, device):
    _require(backend, device)
    spec = _spec(case, device)
    q, k, position_ids, cu_seqlens, positions = _make_inputs(case, device)
    q_exp, k_exp = _expected(case, spec, q, k, positions)
    q_rot, k_rot = ck.apply_rope(q, k, position_ids, spec, layout=case.layout, interleaved=case.interleaved,
                                 cu_seqlens=cu_seqlens, backend=backend, inplace=True)
    assert q_rot.data_ptr() == q.data_ptr() and k_rot.data_ptr() == k.data_ptr()
    assert_close_to_oracle(_canonical(q, case.layout).cpu(), q_exp, case.dtype, "q")
    assert_close_to_oracle(_canonical(k, case.layout).cpu(), k_exp, case.dtype, "k")


BACKWARD_CASES = [c for c in CASES if c.why in ("llama gqa bf16", "partial rotary head 80", "interleaved head 96",
                                                 "pose jumps packed bf16", "yarn temperature", "strided fused qkv")]


@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=str)
def test_backward_matches_float64_autograd(case, backend, device, inplace):
    """Gradients of <rope(q), gq> + <rope(k), gk> against float64 autograd through the oracle."""
    _require(backend, device)
    spec = _spec(case, device)
    q, k, position_ids, cu_seqlens, positions = _make_inputs(case, device)
    g = torch.Generator().manual_seed(1)
    grad_q, grad_k = (torch.randn(x.shape, generator=g).to(case.dtype).to(device) for x in (q, k))
    q_leaf, k_leaf = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    # an in-place op cannot take a leaf: rotate a copy made inside the graph
    q_in, k_in = (q_leaf * 1, k_leaf * 1) if inplace else (q_leaf, k_leaf)
    q_rot, k_rot = ck.apply_rope(q_in, k_in, position_ids, spec, layout=case.layout, interleaved=case.interleaved,
                                 cu_seqlens=cu_seqlens, backend=backend, inplace=inplace)
    torch.autograd.backward((q_rot, k_rot), (grad_q, grad_k))

    inv_freq = spec.inv_freq_for(int(positions.max()) + 1).cpu()
    for name, x, grad, leaf in (("q", q, grad_q, q_leaf), ("k", k, grad_k, k_leaf)):
        x64 = _canonical(x, case.layout).cpu().to(torch.float64).requires_grad_()
        y64 = rope_oracle(x64, positions.cpu(), inv_freq, spec.attention_scaling, case.interleaved)
        y64.backward(_canonical(grad, case.layout).cpu().to(torch.float64))
        assert_close_to_oracle(_canonical(leaf.grad, case.layout).cpu(), x64.grad, case.dtype, f"d{name}")


def test_exact_angle_is_what_makes_large_positions_accurate():
    """Near position 2^20 the plain fp32 product (angle="fp32", what transformers does) misses the float64 rotation by
    far more than the fp32 tolerance, while the exact angle meets it: the oracle comparison has teeth."""
    case = Case("big", head_dim=128)
    q, k, _, _, _ = _make_inputs(case, "cpu")
    positions = torch.randint(2**20 - 4096, 2**20, (case.batch, case.seq), generator=torch.Generator().manual_seed(3))
    spec = _spec(case, "cpu")
    q_exp, _ = _expected(case, spec, q, k, positions)
    for angle, accurate in (("exact", True), ("fp32", False)):
        q_rot, _ = ck.apply_rope(q, k, positions, spec.replace(angle=angle), backend="torch")
        err = (_canonical(q_rot, "bhsd").double() - q_exp).abs().max().item()
        assert (err <= TOLERANCES[torch.float32][1]) == accurate, f"angle={angle}: max error {err:.2e}"


@pytest.mark.parametrize("backend,device", [b for b in BACKENDS if b.values[0] != "torch"])
def test_backends_agree_bitwise_on_angle_mode_fp32(backend, device):
    """angle="fp32" reproduces transformers' rounding: every backend equals the reference to fp32 rounding."""
    _require(backend, device)
    case = Case("fp32 angle", head_dim=64, max_position=2**22)
    spec = _spec(case, "cpu").replace(angle="fp32")
    q, k, position_ids, _, _ = _make_inputs(case, "cpu")
    want = ck.apply_rope(q, k, position_ids, spec, backend="torch")
    got = ck.apply_rope(q.to(device), k.to(device), position_ids.to(device), _spec(case, device).replace(angle="fp32"),
                        backend=backend)
    for w, g_ in zip(want, got):
        torch.testing.assert_close(g_.cpu(), w, rtol=4e-6, atol=4e-6)
