"""Fused RoPE + attention against rope-then-attention in float64, forward and backward, per backend.

Tolerance (flash-attention's rule): a backend's error against the float64 oracle may be at most twice the error of
plain PyTorch rope-then-attention computed in the input dtype (autograd through it), plus a small floor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch
from oracles import rope_oracle

import ctxext_kernels as ck
from ctxext_kernels.ops import cuda_ext, triton_configs
from ctxext_kernels.ops.attention import _cuda_backward, _cuda_forward, attention_backends, rope_attention
from ctxext_kernels.ops.spec import RopeSpec
from ctxext_kernels.ops.triton_configs import Config


@dataclasses.dataclass(frozen=True)
class Case:
    why: str
    head_dim: int = 32
    q_heads: int = 4
    k_heads: int = 2
    batch: int = 2
    seq: int = 24
    dtype: torch.dtype = torch.bfloat16
    causal: bool = True
    interleaved: bool = False
    packed: tuple | None = None  # "thd" with these sequence lengths
    max_position: int | None = None  # random increasing (PoSE-like) ids below it; None: 0..S-1
    rope: tuple = ("default", {})

    def __str__(self):
        return self.why.replace(" ", "-")


CASES = [
    Case("causal gqa bf16"),
    Case("full mha fp16", q_heads=2, k_heads=2, dtype=torch.float16, causal=False),
    Case("mqa head 64 pose ids", head_dim=64, q_heads=3, k_heads=1, max_position=30000),
    Case("varlen packed pose bf16", packed=(9, 3, 12), max_position=5000),
    Case("varlen non-causal fp16", packed=(7, 10), dtype=torch.float16, causal=False),
    Case("interleaved fp32", dtype=torch.float32, interleaved=True, max_position=2**20),
    Case("yarn temperature fp32", dtype=torch.float32, max_position=20000,
         rope=("yarn", {"factor": 8.0, "original_max_position_embeddings": 512})),
    Case("head 128 fp16", head_dim=128, q_heads=2, k_heads=1, batch=1, seq=20, dtype=torch.float16),
    Case("partial rotary bf16", rope=("default", {"partial_rotary_factor": 0.5}), max_position=3000),
    Case("head 80 padded tile bf16", head_dim=80, q_heads=2, k_heads=1, max_position=2**24),
    Case("head 96 positions near 2^24 fp32", head_dim=96, q_heads=2, k_heads=1, batch=1, seq=20,
         dtype=torch.float32, max_position=2**24),
    Case("partial rotary interleaved fp32", dtype=torch.float32, interleaved=True, batch=1,
         rope=("default", {"partial_rotary_factor": 0.25})),
]


def _inputs(case: Case, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch, seq = (1, sum(case.packed)) if case.packed else (case.batch, case.seq)
    q = torch.randn(batch, seq, case.q_heads, case.head_dim, generator=g)
    k, v = (torch.randn(batch, seq, case.k_heads, case.head_dim, generator=g) for _ in range(2))
    if case.max_position is None:
        pos = (torch.cat([torch.arange(n) for n in case.packed]) if case.packed else torch.arange(seq))
        pos = pos.expand(batch, seq)
    else:
        pos = torch.stack([torch.randperm(case.max_position, generator=g)[:seq].sort().values for _ in range(batch)])
    cu = None if case.packed is None else torch.tensor([0, *torch.tensor(case.packed).cumsum(0).tolist()])
    return q, k, v, pos, cu


def _oracle(case, spec, q, k, v, pos, cu):
    """float64: rotate (complex form), repeat kv heads, mask (causal by token index, no cross-sequence), softmax."""
    inv_freq = spec.inv_freq_for(int(pos.max()) + 1)
    qr = rope_oracle(q, pos, inv_freq, spec.attention_scaling, case.interleaved)
    kr = rope_oracle(k, pos, inv_freq, spec.attention_scaling, case.interleaved)
    return _attend(qr, kr, v.to(torch.float64), _keep(case, q.shape[1], cu))


def _keep(case, seq, cu):
    """`[S, S]` True where query m may attend to key n: same packed sequence, and n <= m when causal."""
    seg = torch.zeros(seq, dtype=torch.long) if cu is None else torch.bucketize(torch.arange(seq), cu[1:], right=True)
    keep = seg[:, None] == seg[None, :]
    if case.causal:
        keep &= torch.ones(seq, seq, dtype=torch.bool).tril()
    return keep


def _attend(qr, kr, v, keep):
    """softmax(qr kr^T / sqrt(D)) v over the keys `keep` `[Sq, Sk]` allows, kv heads repeated for GQA; qr `[B, Sq, Hq,
    D]`, kr and v `[B, Sk, Hk, D]`; every op in the inputs' dtype."""
    group = qr.shape[2] // kr.shape[2]
    scores = torch.einsum("bmhd,bnhd->bhmn", qr, kr.repeat_interleave(group, 2)) / math.sqrt(qr.shape[-1])
    probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    return torch.einsum("bhmn,bnhd->bmhd", probs, v.repeat_interleave(group, 2))


def _in_dtype(case, spec, q, k, v, pos, cu):
    """The same math as the oracle, every op in the input dtype (the low-precision yardstick)."""
    inv_freq = spec.inv_freq_for(int(pos.max()) + 1)
    cos, sin = ck.rope_cos_sin(pos, spec.replace(inv_freq=inv_freq), dtype=q.dtype)
    cos, sin = cos[:, :, None], sin[:, :, None]

    def rotate(x):
        x, rest = x[..., :spec.rotary_dim], x[..., spec.rotary_dim:]
        if case.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            y = torch.stack((x1 * cos[..., ::2] - x2 * sin[..., ::2], x2 * cos[..., ::2] + x1 * sin[..., ::2]),
                            -1).flatten(-2)
        else:
            x1, x2 = x.chunk(2, -1)
            y = x * cos + torch.cat((-x2, x1), -1) * sin
        return torch.cat((y, rest), -1)

    return _attend(rotate(q), rotate(k), v, _keep(case, q.shape[1], cu))


def _run_in_dtype(case, q, k, v, pos, cu, spec, grad):
    leaves = [x.to(case.dtype).requires_grad_() for x in (q, k, v)]
    out = _in_dtype(case, spec, *leaves, pos, cu)
    out.backward(grad.to(case.dtype))
    return [out.detach()] + [x.grad for x in leaves]


def _run(case, backend, q, k, v, pos, cu, spec, grad, device="cpu"):
    """Forward + backward through the public API in the case's layout; outputs in canonical [B,S,H,D] on the CPU."""
    leaves = [x.to(device, case.dtype).requires_grad_() for x in (q, k, v)]
    pos, cu, grad = (None if x is None else x.to(device) for x in (pos, cu, grad))
    if case.packed:
        args, layout = [x[0] for x in leaves], "thd"
        ids = pos[0] if case.max_position is not None else None
    else:
        args, layout, ids = [x.transpose(1, 2) for x in leaves], "bhsd", pos
    out = rope_attention(*args, ids, spec, causal=case.causal, layout=layout, cu_seqlens=cu,
                         interleaved=case.interleaved, backend=backend)
    out = out[None] if case.packed else out.transpose(1, 2)
    out.backward(grad.to(case.dtype))
    return [x.cpu() for x in [out.detach()] + [x.grad for x in leaves]]


def _require(backend):
    usable, reason = attention_backends("cpu")[backend]
    if not usable:
        pytest.skip(reason)


def _check_against_float64(case, backend, device="cpu"):
    spec = RopeSpec.from_params(case.head_dim, 10000.0, case.rope[0], max_position_embeddings=2048, **case.rope[1])
    q, k, v, pos, cu = _inputs(case)
    leaves64 = [x.to(case.dtype).to(torch.float64).requires_grad_() for x in (q, k, v)]
    want = _oracle(case, spec, *leaves64, pos, cu)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want.backward(grad)
    expected = [want.detach()] + [x.grad for x in leaves64]

    got = _run(case, backend, q, k, v, pos, cu, spec, grad, device)
    baseline = _run_in_dtype(case, q, k, v, pos, cu, spec, grad)
    floor = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[case.dtype]
    for name, g_, b_, e_ in zip(("out", "dq", "dk", "dv"), got, baseline, expected):
        err = (g_.to(torch.float64) - e_).abs().max().item()
        ref_err = (b_.to(torch.float64) - e_).abs().max().item()
        assert err <= 2 * ref_err + floor, f"{name}: error {err:.3e} vs plain torch in {case.dtype} {ref_err:.3e}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_backward_match_float64(case, backend):
    _require(backend)
    _check_against_float64(case, backend)


PACKED_Q, PACKED_K = (1, 3, 6, 2), (9, 4, 6, 20)  # decode, chunked prefill, a whole sequence, a tile-crossing offset


@pytest.mark.parametrize("layout,lengths_q,lengths_k,causal,dtype", [
    ("thd", PACKED_Q, PACKED_K, True, torch.float32),
    ("thd", PACKED_Q, PACKED_K, False, torch.bfloat16),
    ("thd", PACKED_Q, PACKED_K, True, torch.bfloat16),
    ("bshd", (5, 5), (21, 21), True, torch.float32),
    ("bshd", (5, 5), (21, 21), False, torch.float32),
    ("bhsd", (1, 1), (7, 7), True, torch.bfloat16),
], ids=["packed-causal-fp32", "packed-full-bf16", "packed-causal-bf16", "bshd-chunk-causal-fp32",
        "bshd-chunk-full-fp32", "bhsd-decode-bf16"])
def test_triton_rotated_keys_longer_than_queries(layout, lengths_q, lengths_k, causal, dtype):
    """`k_rotated=True` on the Triton kernels: queries (the last tokens of their sequences) against more, already
    rotated keys, bottom-right causal, packed with their own cu_seqlens_k; float64 oracle, forward and backward.
    Tolerance as above: at most twice the error of the same math in the input dtype, plus a floor."""
    from test_attention_cached_keys import SPEC, _case, _full_attention

    _require("triton")
    q, k_rot, v, q_ids, inv_freq = _case(lengths_q, lengths_k, torch.float32)
    q, k_rot, v = (x.to(dtype) for x in (q, k_rot, v))
    leaves64 = [x.to(torch.float64).requires_grad_() for x in (q, k_rot, v)]
    q_rot64 = rope_oracle(leaves64[0][None], q_ids[None], inv_freq)[0]
    want = _full_attention(q_rot64, leaves64[1], leaves64[2], lengths_q, lengths_k, causal)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want.backward(grad)

    # the yardstick: rotated q rounded to the dtype (what a RoPE pass stores), then attention in the dtype
    yard = [x.clone().requires_grad_() for x in (q, k_rot, v)]
    q_rot = rope_oracle(yard[0].to(torch.float64)[None], q_ids[None], inv_freq)[0]
    q_rot = yard[0] + (q_rot.to(dtype) - yard[0]).detach()  # value rounded, gradient of the rotation: identity
    _full_attention(q_rot, yard[1], yard[2], lengths_q, lengths_k, causal).backward(grad.to(dtype))

    leaves = [x.clone().requires_grad_() for x in (q, k_rot, v)]
    if layout == "thd":
        cu_q, cu_k = (torch.tensor([0, *n]).cumsum(0) for n in (lengths_q, lengths_k))
        out = rope_attention(*leaves, q_ids, SPEC, causal=causal, layout="thd", cu_seqlens=cu_q, cu_seqlens_k=cu_k,
                             k_rotated=True, backend="triton")
        out.backward(grad.to(dtype))
        got = [out.detach()] + [x.grad for x in leaves]
    else:
        def batched(x, n):  # packed rows of equal-length sequences -> [B, S, H, D] -> layout
            x = x.reshape(len(lengths_q), n, *x.shape[1:])
            return x.transpose(1, 2) if layout == "bhsd" else x
        args = [batched(x, n) for x, n in zip(leaves, (lengths_q[0], lengths_k[0], lengths_k[0]))]
        out = rope_attention(*args, q_ids.reshape(len(lengths_q), -1), SPEC, causal=causal, layout=layout,
                             k_rotated=True, backend="triton")
        out = out.transpose(1, 2) if layout == "bhsd" else out
        out.reshape(-1, *out.shape[2:]).backward(grad.to(dtype).reshape(-1, *out.shape[2:]))
        got = [out.detach().reshape(-1, *out.shape[2:])] + [x.grad for x in leaves]
    expected = [want.detach()] + [x.grad for x in leaves64]
    baseline = [None] + [x.grad for x in yard]
    baseline[0] = _full_attention(q_rot.detach(), *(x.detach() for x in yard[1:]), lengths_q, lengths_k, causal)
    floor = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for name, g_, b_, e_ in zip(("out", "dq", "dk_rot", "dv"), got, baseline, expected):
        err = (g_.to(torch.float64) - e_).abs().max().item()
        ref_err = (b_.to(torch.float64) - e_).abs().max().item()
        assert err <= 2 * ref_err + floor, f"{name}: error {err:.3e} vs plain torch in {dtype} {ref_err:.3e}"


# The interpreter's own tiles are 16 x 16 (triton_configs.INTERPRETER); the GPU tables also use unequal ones (forward
# 128 x 64, dK/dV 32 x 64, ...), whose causal block bounds (the first block a Q or K block sees, the masked diagonal,
# the offset of longer keys) must hold for either ratio. Every kernel gets the same (block_m, block_n).
UNEQUAL_TILES = {"q-tiles-larger": Config(32, 16, 4, 1), "k-tiles-larger": Config(16, 32, 4, 1)}


@pytest.mark.parametrize("tiles", UNEQUAL_TILES, ids=str)
@pytest.mark.parametrize("case", ["causal", "varlen", "full", "longer-keys"])
def test_triton_unequal_tiles_match_float64(case, tiles):
    _require("triton")
    with contextlib.ExitStack() as stack:
        for kernel in ("fwd", "dq", "dkdv"):
            stack.enter_context(triton_configs.override(kernel, UNEQUAL_TILES[tiles]))
        if case == "longer-keys":
            test_triton_rotated_keys_longer_than_queries("thd", (3, 37, 1), (40, 37, 50), True, torch.float32)
        else:
            _check_against_float64(Case(case, seq=70, causal=case != "full", dtype=torch.float32,
                                        packed=(37, 5, 50) if case == "varlen" else None), "triton")


def test_triton_many_packed_sequences():
    """More sequences than one chunk of the kernels' sequence search (`_tile`), of lengths 0 to 3: each program
    still finds its own sequence (packed output == each sequence attended alone)."""
    _require("triton")
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 4, (300,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    q, k, v = (torch.randn(int(cu[-1]), 1, 16, generator=g) for _ in range(3))
    spec = RopeSpec.from_params(16)
    out = rope_attention(q, k, v, None, spec, layout="thd", cu_seqlens=cu, backend="triton")
    want = torch.cat([rope_attention(q[a:b], k[a:b], v[a:b], None, spec, layout="thd",
                                     cu_seqlens=torch.tensor([0, b - a]), backend="torch")
                      for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()) if b > a])
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)


# The CUDA kernels take fp16/bf16 and head_dim 64/128: the same cases at those sizes, plus sequences longer than one
# 64-row tile (several tiles, a ragged last one) -- on a GPU only.
CUDA_CASES = [dataclasses.replace(c, head_dim=max(c.head_dim, 64)) for c in CASES if c.dtype != torch.float32] + [
    Case("cuda multi-tile causal gqa", head_dim=128, q_heads=4, k_heads=1, batch=2, seq=200, max_position=100000),
    Case("cuda multi-tile varlen", head_dim=64, packed=(70, 1, 130), dtype=torch.float16),
    Case("cuda multi-tile full", head_dim=64, seq=150, causal=False),
    Case("cuda interleaved fp16", head_dim=64, dtype=torch.float16, interleaved=True, max_position=2**20),
    Case("cuda head 128 varlen full", head_dim=128, packed=(65, 3, 64), causal=False, max_position=9000),
    Case("cuda head 128 multi-tile full fp16", head_dim=128, q_heads=2, k_heads=2, seq=130, causal=False,
         dtype=torch.float16, rope=("default", {"partial_rotary_factor": 0.5})),
]


# Every case on the Triton backend; on the CUDA one those of the head_dims it takes (it refuses the others by name)
GPU_RUNS = [(case, backend) for case in CUDA_CASES for backend in ("cuda", "triton")
            if backend == "triton" or case.head_dim in (64, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("case, backend", GPU_RUNS, ids=[f"{case}-{backend}" for case, backend in GPU_RUNS])
def test_gpu_forward_backward_match_float64(case, backend):
    usable, reason = attention_backends("cuda")[backend]
    if not torch.cuda.is_available() or not usable:
        pytest.skip(f"needs a GPU with the {backend} backend: {reason}")
    _check_against_float64(case, backend, "cuda")


@dataclasses.dataclass(frozen=True)
class KvCase:
    """Queries against a longer run of already rotated keys (a KV cache, a chunked prefill): per sequence q_lens[i]
    queries at the last positions of k_lens[i] keys."""
    why: str
    q_lens: tuple
    k_lens: tuple
    packed: bool  # "thd" with cu_seqlens / cu_seqlens_k; else one batch of equal lengths
    head_dim: int = 64
    dtype: torch.dtype = torch.bfloat16
    causal: bool = True
    interleaved: bool = False
    rotary_fraction: float = 1.0

    def __str__(self):
        return self.why.replace(" ", "-")


KV_CASES = [
    KvCase("decode chunk causal head 128", (5, 5), (70, 70), packed=False, head_dim=128),
    KvCase("chunked prefill full fp16", (40,), (150,), packed=False, dtype=torch.float16, causal=False),
    KvCase("varlen longer keys causal fp16", (3, 64, 1), (10, 64, 200), packed=True, dtype=torch.float16),
    KvCase("varlen interleaved partial head 128", (17, 70), (17, 90), packed=True, head_dim=128, interleaved=True,
           rotary_fraction=0.5),
]


def _kv_inputs(case: KvCase):
    """q `[B, Sq, 4, D]`, rotated keys and v `[B, Sk, 2, D]` (in the case's dtype), query positions `[B, Sq]`,
    inv_freq, cu_seqlens / cu_seqlens_k (or None) and the mask `[B, Sq, Sk]` (bottom-right causal per sequence)."""
    g = torch.Generator().manual_seed(0)
    spec = RopeSpec.from_params(case.head_dim, 10000.0, partial_rotary_factor=case.rotary_fraction)
    batch = 1 if case.packed else len(case.q_lens)
    sq, sk = (sum(case.q_lens), sum(case.k_lens)) if case.packed else (case.q_lens[0], case.k_lens[0])
    q = torch.randn(batch, sq, 4, case.head_dim, generator=g)
    k, v = (torch.randn(batch, sk, 2, case.head_dim, generator=g) for _ in range(2))
    q_pos, k_pos, keep = torch.zeros(batch, sq, dtype=torch.long), torch.zeros(batch, sk, dtype=torch.long), \
        torch.zeros(batch, sq, sk, dtype=torch.bool)
    q0 = k0 = 0
    for i, (nq, nk) in enumerate(zip(case.q_lens, case.k_lens)):
        b = 0 if case.packed else i
        start = 1000 * i  # the sequence's first position
        k_pos[b, k0:k0 + nk] = start + torch.arange(nk)
        q_pos[b, q0:q0 + nq] = start + nk - nq + torch.arange(nq)
        seen = torch.ones(nq, nk, dtype=torch.bool)
        keep[b, q0:q0 + nq, k0:k0 + nk] = seen.tril(nk - nq) if case.causal else seen
        if case.packed:
            q0, k0 = q0 + nq, k0 + nk
    k_rot = rope_oracle(k, k_pos, spec.inv_freq, spec.attention_scaling, case.interleaved)
    cu_q, cu_k = ((torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
                   for lens in (case.q_lens, case.k_lens)) if case.packed else (None, None))
    return (*(x.to(case.dtype) for x in (q, k_rot, v)), q_pos, spec, cu_q, cu_k, keep[:, None])


# The kernel interface below the op: rotated keys, Sk >= Sq aligned bottom-right, cu_seqlens_k. The op reaches it with
# Sk == Sq only, so this calls the CUDA launchers of ops/attention.py directly -- on a GPU only.
@pytest.mark.gpu
@pytest.mark.parametrize("case", KV_CASES, ids=str)
def test_gpu_cuda_kernel_with_longer_rotated_keys(case):
    usable, reason = attention_backends("cuda")["cuda"]
    if not torch.cuda.is_available() or not usable:
        pytest.skip(f"needs a GPU with the cuda backend: {reason}")
    q, k_rot, v, pos, spec, cu_q, cu_k, keep = _kv_inputs(case)
    scaling, interleaved = spec.attention_scaling, case.interleaved
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def reference(dtype):  # out, dq, dk, dv of rope(q) against k_rot, every op in `dtype`
        leaves = [x.to(dtype).requires_grad_() for x in (q, k_rot, v)]
        q_rot = rope_oracle(leaves[0], pos, spec.inv_freq, scaling, interleaved).to(dtype)
        out = _attend(q_rot, leaves[1], leaves[2], keep)
        out.backward(grad.to(dtype))
        return [out.detach()] + [x.grad for x in leaves]

    expected, baseline = reference(torch.float64), reference(case.dtype)
    qc, kc, vc, gc = (x.to("cuda", case.dtype) for x in (q, k_rot, v, grad))
    pos_c, inv_freq = pos.cuda(), spec.inv_freq.cuda()
    cu_q, cu_k = (None if x is None else x.cuda() for x in (cu_q, cu_k))
    flags = (scaling, 1.0 / math.sqrt(case.head_dim), case.causal, interleaved, True, True)
    out, lse = torch.empty_like(qc), torch.empty(qc.shape[:3], device="cuda", dtype=torch.float32)
    _cuda_forward(qc, kc, vc, out, lse, pos_c, inv_freq, cu_q, cu_k, *flags)
    dq, dk, dv = torch.empty_like(qc), torch.empty_like(kc), torch.empty_like(vc)
    q_rot = torch.empty_like(qc)  # the backward takes q rotated, as fused_backward hands it over
    cuda_ext.rope_forward(qc, None, q_rot, None, pos_c, inv_freq, scaling, interleaved, False, True)
    _cuda_backward(gc, q_rot, kc, vc, out, lse, dq, dk, dv, pos_c, inv_freq, cu_q, cu_k, *flags)
    floor = {torch.float16: 1e-3, torch.bfloat16: 1e-2}[case.dtype]
    for name, got, base, want in zip(("out", "dq", "dk_rot", "dv"), (out, dq, dk, dv), baseline, expected):
        err = (got.cpu().double() - want).abs().max().item()
        ref_err = (base.double() - want).abs().max().item()
        assert err <= 2 * ref_err + floor, f"{name}: error {err:.3e} vs plain torch in {case.dtype} {ref_err:.3e}"


def test_rotation_happens_inside():
    """Same result as rotating with the RoPE op first and attending without rotation (spec with zero frequencies)."""
    case = CASES[0]
    spec = RopeSpec.from_params(case.head_dim, 10000.0)
    q, k, v, pos, _ = _inputs(case)
    q, k, v = (x.transpose(1, 2).to(torch.float32) for x in (q, k, v))
    q_rot, k_rot = ck.apply_rope(q, k, pos, spec, backend="torch")
    unrotated = spec.replace(inv_freq=torch.zeros_like(spec.inv_freq))
    want = rope_attention(q_rot, k_rot, v, pos, unrotated, backend="torch")
    for backend in ("torch", "triton"):
        if attention_backends("cpu")[backend][0]:
            torch.testing.assert_close(rope_attention(q, k, v, pos, spec, backend=backend), want, rtol=2e-5,
                                       atol=2e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    _require(backend)
    q, k, v = (torch.randn(1, 16, h, 32, dtype=torch.float32) for h in (2, 1, 1))
    spec = RopeSpec.from_params(32)
    pos = torch.arange(16)[None]
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), pos, spec.inv_freq, None, None, None, 1.0, 0.2,
            True, "bshd", False, True, False, backend)
    torch.library.opcheck(torch.ops.ctxext.rope_attention.default, args)


def test_opcheck_rotated_keys_and_rope_keys():
    """The k_rotated variant (more keys than queries, packed with their own boundaries) and the keys-only RoPE op."""
    q, k, v = torch.randn(5, 2, 32), torch.randn(9, 1, 32), torch.randn(9, 1, 32)
    spec = RopeSpec.from_params(32)
    cu_q, cu_k = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 4, 9], dtype=torch.int32)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), torch.arange(5)[None], spec.inv_freq, cu_q,
            cu_k, None, 1.0, 0.2, True, "thd", False, True, True, "torch")
    torch.library.opcheck(torch.ops.ctxext.rope_attention.default, args)
    # rows of left-padded keys (k_leftpad)
    q, k, v = torch.randn(2, 3, 2, 32), torch.randn(2, 7, 1, 32), torch.randn(2, 7, 1, 32)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), torch.arange(4, 7).expand(2, 3), spec.inv_freq,
            None, None, torch.tensor([0, 5], dtype=torch.int32), 1.0, 0.2, True, "bshd", False, True, True, "torch")
    torch.library.opcheck(torch.ops.ctxext.rope_attention.default, args)
    keys = torch.randn(1, 6, 2, 32, requires_grad=True)
    torch.library.opcheck(torch.ops.ctxext.rope_keys.default,
                          (keys, torch.arange(6)[None], spec.inv_freq, 1.0, "bshd", False, False, True, "torch"))


BAD = [
    ("v shape", lambda q, k, v: rope_attention(q, k, v[:, :, :3], None, RopeSpec.from_params(32)), "v must match k"),
    ("heads not multiple", lambda q, k, v: rope_attention(q[:, :3], k[:, :2].contiguous(), v[:, :2].contiguous(),
                                                          None, RopeSpec.from_params(32)), "multiple of k/v heads"),
    ("cuda on cpu", lambda q, k, v: rope_attention(q, k, v, None, RopeSpec.from_params(32), backend="cuda"),
     "not usable"),
    ("cu_seqlens with bhsd", lambda q, k, v: rope_attention(q, k, v, None, RopeSpec.from_params(32),
                                                            cu_seqlens=torch.tensor([0, 8])), "layout='thd'"),
    ("float ids", lambda q, k, v: rope_attention(q, k, v, torch.zeros(8), RopeSpec.from_params(32)), "integer"),
    ("unknown backend", lambda q, k, v: rope_attention(q, k, v, None, RopeSpec.from_params(32), backend="xla"),
     "backend must be one of"),
    ("fp32 head 256 on triton", lambda q, k, v: rope_attention(*(x.repeat(1, 1, 1, 8) for x in (q, k, v)), None,
                                                               RopeSpec.from_params(256), backend="triton"),
     "head_dim up to 128"),
]


@pytest.mark.parametrize("what,call,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_named(what, call, message):
    q, k, v = torch.randn(1, 4, 8, 32), torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
        call(q, k, v)


def test_cuda_backend_reports_why_not():
    usable, reason = attention_backends("cpu")["cuda"]
    assert not usable and reason


def test_benchmark_smoke_writes_report(tmp_path):
    """benchmarks/bench_attention.py --smoke runs on CPU and writes JSON, markdown and PNG with measured providers."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_attention

    bench_attention.main(["--smoke", "--repeats", "1", "--output", str(tmp_path)])
    report = json.loads((tmp_path / "bench_attention.json").read_text())
    measured = {r["provider"] for r in report["results"] if not r["skipped"] and r["metrics"].get("tflops")}
    assert {"fused-torch-reference", "ropeop+sdpa-flash", "hf-rope+sdpa"} <= measured
    assert (tmp_path / "bench_attention.md").exists() and (tmp_path / "bench_attention.png").exists()
