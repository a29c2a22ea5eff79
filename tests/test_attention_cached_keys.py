"""`rope_attention(..., k_rotated=True)`: queries against already rotated keys that may outnumber them (a KV cache).

Oracle: the queries are the last tokens of longer sequences, so attending them to the cached rotated keys must equal
the matching rows of ordinary causal attention over the whole sequences, computed in float64 from unrotated inputs
(rotation as complex multiplication, `oracles.rope_oracle`). Gradients: float64 autograd of that same full attention
restricted to the query rows, with the rotated keys as the leaves (what the op's k gradient means when k_rotated).
"""

from __future__ import annotations

import math

import pytest
import torch
from oracles import rope_oracle

import ctxext_kernels as ck
from ctxext_kernels.ops.attention import attention_backends, rope_attention
from ctxext_kernels.ops.spec import RopeSpec

SPEC = RopeSpec.from_params(32, 10000.0, "linear", factor=2.0, max_position_embeddings=64)


def _full_attention(q_rot, k_rot, v, lengths_q, lengths_k, causal):
    """float64 attention of packed rows; per sequence the queries are its last lengths_q tokens of lengths_k."""
    outs, qs, ks = [], 0, 0
    for n_q, n_k in zip(lengths_q, lengths_k):
        q_, k_, v_ = q_rot[qs:qs + n_q], k_rot[ks:ks + n_k], v[ks:ks + n_k]
        group = q_.shape[1] // k_.shape[1]
        k_, v_ = k_.repeat_interleave(group, 1), v_.repeat_interleave(group, 1)
        scores = torch.einsum("mhd,nhd->hmn", q_, k_) / math.sqrt(q_.shape[-1])
        if causal:
            keep = torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + n_k - n_q
            scores = scores.masked_fill(~keep, float("-inf"))
        outs.append(torch.einsum("hmn,nhd->mhd", scores.softmax(-1), v_))
        qs, ks = qs + n_q, ks + n_k
    return torch.cat(outs)


def _case(lengths_q, lengths_k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    total_k = sum(lengths_k)
    # PoSE-like increasing ids per sequence; the queries take the ids of their sequence's last tokens
    ids = torch.cat([torch.randperm(4000, generator=g)[:n].sort().values for n in lengths_k])
    q_ids = torch.cat([ids[s + n_k - n_q:s + n_k] for s, n_q, n_k in
                       zip(torch.tensor([0, *lengths_k]).cumsum(0).tolist(), lengths_q, lengths_k)])
    q = torch.randn(sum(lengths_q), 4, 32, generator=g).to(dtype)
    k, v = (torch.randn(total_k, 2, 32, generator=g).to(dtype) for _ in range(2))
    inv_freq = SPEC.inv_freq
    k_rot = rope_oracle(k[None], ids[None], inv_freq)[0].to(dtype)  # what a cache of rotated keys holds
    return q, k_rot, v, q_ids, inv_freq


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths_q,lengths_k", [((1, 1, 1), (9, 4, 13)), ((3, 5), (3, 12)), ((6,), (6,))])
def test_packed_queries_against_longer_rotated_keys(lengths_q, lengths_k, causal):
    dtype = torch.float32
    q, k_rot, v, q_ids, inv_freq = _case(lengths_q, lengths_k, dtype)
    cu_q = torch.tensor([0, *lengths_q]).cumsum(0)
    cu_k = torch.tensor([0, *lengths_k]).cumsum(0)
    leaves = [x.clone().requires_grad_() for x in (q, k_rot, v)]
    out = rope_attention(*leaves, q_ids, SPEC, causal=causal, layout="thd", cu_seqlens=cu_q, cu_seqlens_k=cu_k,
                         k_rotated=True, backend="torch")

    leaves64 = [x.to(torch.float64).requires_grad_() for x in (q, k_rot, v)]
    q_rot64 = rope_oracle(leaves64[0][None], q_ids[None], inv_freq)[0]
    want = _full_attention(q_rot64, leaves64[1], leaves64[2], lengths_q, lengths_k, causal)
    torch.testing.assert_close(out.to(torch.float64), want, rtol=1e-5, atol=1e-5)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want.backward(grad)
    out.backward(grad.to(dtype))
    for name, got, expected in zip(("dq", "dk_rot", "dv"), leaves, leaves64):
        torch.testing.assert_close(got.grad.to(torch.float64), expected.grad, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_decode_step_equals_last_row_of_full_attention(layout):
    """One new query per row against a batch of cached keys (Sk > Sq = 1): bottom-right causal alignment."""
    q, k_rot, v, q_ids, inv_freq = _case((1, 1), (7, 7), torch.float32, seed=1)
    batch = lambda x, n: x.reshape(2, n, *x.shape[1:])  # noqa: E731  [B, S, H, D]
    to_layout = (lambda x: x.transpose(1, 2)) if layout == "bhsd" else (lambda x: x)
    out = rope_attention(*(to_layout(batch(x, n)) for x, n in ((q, 1), (k_rot, 7), (v, 7))), q_ids.reshape(2, 1),
                         SPEC, layout=layout, k_rotated=True, backend="torch")
    out = out.transpose(1, 2) if layout == "bhsd" else out
    q_rot64 = rope_oracle(q.to(torch.float64)[None], q_ids[None], inv_freq)[0]
    want = _full_attention(q_rot64, k_rot.to(torch.float64), v.to(torch.float64), (1, 1), (7, 7), True)
    torch.testing.assert_close(out.reshape(2, 4, 32).to(torch.float64), want, rtol=1e-5, atol=1e-5)


def _left_padded_oracle(q_rot, k_rot, v, leftpad, causal):
    """float64 attention of batched rows `[B, S, H, D]` whose keys start at slot leftpad[b]; the queries are the last
    Sq slots of each row (causal: query i sees slots up to i + Sk - Sq); a query that sees no key gives 0."""
    n_q, n_k = q_rot.shape[1], k_rot.shape[1]
    group = q_rot.shape[2] // k_rot.shape[2]
    k_rot, v = k_rot.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    scores = torch.einsum("bmhd,bnhd->bhmn", q_rot, k_rot) / math.sqrt(q_rot.shape[-1])
    slot = torch.arange(n_k)
    keep = (slot[None, :] >= leftpad[:, None])[:, None, None, :]
    if causal:
        keep = keep & (slot[None, :] <= torch.arange(n_q)[:, None] + n_k - n_q)
    probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    probs = torch.where(keep.any(-1, keepdim=True), probs, 0.0)
    return torch.einsum("bhmn,bnhd->bmhd", probs, v)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend,device,dtype", [
    ("torch", "cpu", torch.float32), ("triton", "cpu", torch.float32), ("triton", "cpu", torch.bfloat16),
    pytest.param("triton", "cuda", torch.float32, marks=pytest.mark.gpu),
    pytest.param("triton", "cuda", torch.bfloat16, marks=pytest.mark.gpu)],
    ids=["torch", "triton", "triton-bf16", "gpu", "gpu-bf16"])
def test_left_padded_keys(backend, device, dtype, causal):
    """`k_leftpad` (rows of a left-padded KV cache, flash-attn's cache_leftpad): row b attends its key slots from
    k_leftpad[b] on, the queries stay the rows' last slots, and a query left of its row's keys gives 0; float64
    oracle, forward and backward, and no gradient reaches the padding slots."""
    usable, why_not = attention_backends(device)[backend]
    if not usable:
        pytest.skip(why_not)
    batch, n_q, n_k = 3, 3, 21
    leftpad = torch.tensor([0, 5, 19])  # the last row: 2 keys, so causally its first query sees none
    q, k_rot, v, q_ids, inv_freq = _case((n_q,) * batch, (n_k,) * batch, dtype, seed=2)
    rows = lambda x, n: x.reshape(batch, n, *x.shape[1:])  # noqa: E731  [B, S, H, D]
    leaves = [rows(x, n).to(device).requires_grad_() for x, n in ((q, n_q), (k_rot, n_k), (v, n_k))]
    out = rope_attention(*leaves, q_ids.reshape(batch, n_q).to(device), SPEC, causal=causal, layout="bshd",
                         k_rotated=True, k_leftpad=leftpad.to(device, torch.int32), backend=backend)

    leaves64 = [x.detach().cpu().to(torch.float64).requires_grad_() for x in leaves]
    q_rot64 = rope_oracle(leaves64[0], q_ids.reshape(batch, n_q), inv_freq)
    want = _left_padded_oracle(q_rot64, leaves64[1], leaves64[2], leftpad, causal)
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: inputs exact, q rotated and P rounded to bf16
    torch.testing.assert_close(out.cpu().to(torch.float64), want, rtol=tol, atol=tol)
    if causal:
        assert not out[2, 0].any(), "a query that sees no key must give 0"
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want.backward(grad)
    out.backward(grad.to(device, dtype))
    for name, got, expected in zip(("dq", "dk_rot", "dv"), leaves, leaves64):
        torch.testing.assert_close(got.grad.cpu().to(torch.float64), expected.grad, rtol=tol, atol=tol,
                                   msg=lambda m: f"{name}: {m}")
    for grad_kv in (leaves[1].grad, leaves[2].grad):
        assert not grad_kv[1, :5].any() and not grad_kv[2, :19].any(), "gradient at padding slots"


@pytest.mark.parametrize("what,kwargs,message", [
    ("packed layout", dict(layout="thd"), "layout 'bhsd' or 'bshd'"),
    ("wrong shape", dict(k_leftpad=torch.zeros(2, dtype=torch.int32)), r"\[batch\] = \[1\]"),
    ("float", dict(k_leftpad=torch.zeros(1)), "int32 or int64"),
    ("past the keys", dict(k_leftpad=torch.tensor([8])), r"in \[0, 7\]"),
    ("cuda backend", dict(backend="cuda"), "no k_leftpad"),
])
def test_bad_leftpad_is_named(what, kwargs, message):
    k_leftpad = kwargs.pop("k_leftpad", torch.zeros(1, dtype=torch.int32))
    if kwargs.get("layout") == "thd":
        q, k = torch.randn(3, 4, 32), torch.randn(3, 2, 32)
    else:
        q, k = torch.randn(1, 4, 3, 32), torch.randn(1, 2, 7, 32)
    kwargs.setdefault("backend", "torch")
    with pytest.raises((ValueError, TypeError, NotImplementedError), match=message):
        rope_attention(q, k, k.clone(), None, SPEC, k_rotated=True, k_leftpad=k_leftpad, **kwargs)


def test_keys_rotated_by_apply_rope_alone_match_joint_rotation():
    """`apply_rope(None, k)` rotates keys exactly as the joint q+k launch does, and its gradient is the inverse."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 10, 32, generator=g), torch.randn(2, 2, 10, 32, generator=g)
    ids = torch.randint(0, 5000, (2, 10), generator=g)
    _, k_joint = ck.apply_rope(q, k, ids, SPEC, backend="torch")
    k_leaf = k.clone().requires_grad_()
    none, k_alone = ck.apply_rope(None, k_leaf, ids, SPEC, backend="torch")
    assert none is None
    torch.testing.assert_close(k_alone, k_joint, rtol=0, atol=0)
    k_alone.backward(k_alone.detach())  # rotating back the rotated keys gives the keys (the rotation is orthogonal)
    torch.testing.assert_close(k_leaf.grad, k, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("what,kwargs,message", [
    ("longer keys unrotated", dict(k_len=7), "same batch/sequence dims"),
    ("fewer keys than queries", dict(k_len=2, k_rotated=True), "at least its sequence length"),
    ("cu_seqlens_k without k_rotated", dict(layout="thd", cu_seqlens_k=True), "pass k_rotated=True"),
    ("packed lengths differ, no boundaries", dict(layout="thd", k_len=7, k_rotated=True), "cu_seqlens_k"),
])
def test_inconsistent_key_geometry_is_named(what, kwargs, message):
    k_len, layout = kwargs.pop("k_len", 3), kwargs.pop("layout", "bhsd")
    if layout == "thd":
        q, k = torch.randn(3, 4, 32), torch.randn(k_len, 2, 32)
        if kwargs.pop("cu_seqlens_k", False):
            kwargs["cu_seqlens_k"] = torch.tensor([0, 3])
    else:
        q, k = torch.randn(1, 4, 3, 32), torch.randn(1, 2, k_len, 32)
    with pytest.raises(ValueError, match=message):
        rope_attention(q, k, k.clone(), None, SPEC, layout=layout, backend="torch", **kwargs)
