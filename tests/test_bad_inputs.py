"""Bad input against every public op, on every backend that runs here.

Each case is one class of mistake (kinds, dtypes, shapes, strides and aliasing, values, device, inconsistent
metadata) fed to `apply_rope` (out of place and in place), `rope_attention` (incl. `k_rotated`), `rope_cos_sin` or
`RopeSpec.from_params`. Every one must raise the named error class with a message naming the argument, before any
kernel is launched (the launchers are replaced by a tripwire: the cases that used to crash the Triton kernels, read
out of bounds or return garbage now never reach them), and leave the caller's tensors bit-for-bit as they were.
The second half checks the valid edge cases next to them: empty tensors, default positions for a batch, in-place
views of one buffer, and that the value checks cost one host read of data at most (none when switched off).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from oracles import assert_close_to_oracle, rope_oracle

import ctxext_kernels as ck
from ctxext_kernels import RopeSpec
from ctxext_kernels.ops import attention as attention_module
from ctxext_kernels.ops import rope as rope_module

SPEC = RopeSpec.from_params(32, 10000.0)
DYNAMIC = RopeSpec.from_params(32, rope_type="dynamic", factor=2.0, max_position_embeddings=64)
NAN = float("nan")


def _require(backend: str) -> None:
    usable, reason = ck.backends("cpu")[backend]
    if not usable:
        if backend == "cpu" and os.environ.get("CTXEXT_REQUIRE_HOST_BUILD") == "1":
            pytest.fail(f"the host build is required here but unusable: {reason}")
        pytest.skip(reason)


def _tensors() -> SimpleNamespace:
    """Fresh inputs: q, k, v in "bhsd" `[2, H, 6, 32]` with ids `[2, 6]`; tq, tk, tv packed "thd" `[12, H, 32]` with
    two sequences (cu = [0, 5, 12])."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    return SimpleNamespace(q=randn(2, 2, 6, 32), k=randn(2, 1, 6, 32), v=randn(2, 1, 6, 32),
                           pos=torch.randint(0, 100, (2, 6), generator=g), tq=randn(12, 2, 32), tk=randn(12, 1, 32),
                           tv=randn(12, 1, 32), tpos=torch.arange(12), cu=torch.tensor([0, 5, 12], dtype=torch.int32))


@pytest.fixture
def tripwire(monkeypatch):
    """Any kernel launch (RoPE launcher of every backend, the attention op) fails the test."""
    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched for bad input")

    monkeypatch.setattr(rope_module, "_launcher", lambda backend: launched)
    monkeypatch.setattr(attention_module, "_rope_attention", launched)


def _assert_refused(call, t, error, message):
    before = {name: x.clone() for name, x in vars(t).items()}
    with pytest.raises(error, match=message):
        call(t)
    for name, x in vars(t).items():
        assert torch.equal(x, before[name]), f"{name} was modified by a refused call"


def _view_of_leaf(x):
    return x.clone().requires_grad_()[:, :]


# (id, call(t, **apply_rope kwargs), error class, message). Called with backend= and inplace=.
ROPE_CASES = [
    # kinds
    ("q list", lambda t, **kw: ck.apply_rope(t.q.tolist(), t.k, t.pos, SPEC, **kw), TypeError, "q must be a torch"),
    ("k None", lambda t, **kw: ck.apply_rope(t.q, None, t.pos, SPEC, **kw), TypeError, "k must be a torch"),
    ("position_ids list", lambda t, **kw: ck.apply_rope(t.q, t.k, [0, 1, 2, 3, 4, 5], SPEC, **kw), TypeError,
     "position_ids must be a torch"),
    ("spec None", lambda t, **kw: ck.apply_rope(t.q, t.k, t.pos, None, **kw), TypeError, "spec must be a RopeSpec"),
    ("spec dict", lambda t, **kw: ck.apply_rope(t.q, t.k, t.pos, {"rope_theta": 1e4}, **kw), TypeError,
     "spec must be a RopeSpec"),
    ("interleaved string", lambda t, **kw: ck.apply_rope(t.q, t.k, t.pos, SPEC, interleaved="no", **kw), TypeError,
     "interleaved must be a bool"),
    ("cu_seqlens list", lambda t, **kw: ck.apply_rope(t.tq, t.tk, None, SPEC, layout="thd", cu_seqlens=[0, 5, 12],
                                                      **kw), TypeError, "cu_seqlens must be a torch"),
    # dtypes
    ("int q", lambda t, **kw: ck.apply_rope(t.q.long(), t.k, t.pos, SPEC, **kw), TypeError, "q must be float32"),
    ("float64 q and k", lambda t, **kw: ck.apply_rope(t.q.double(), t.k.double(), t.pos, SPEC, **kw), TypeError,
     "q must be float32"),
    ("mixed dtypes", lambda t, **kw: ck.apply_rope(t.q, t.k.half(), t.pos, SPEC, **kw), TypeError, "same dtype"),
    ("float positions", lambda t, **kw: ck.apply_rope(t.q, t.k, t.pos.float(), SPEC, **kw), TypeError,
     "position_ids must be an integer"),
    ("bool positions", lambda t, **kw: ck.apply_rope(t.q, t.k, t.pos > 3, SPEC, **kw), TypeError,
     "position_ids must be an integer"),
    ("float cu_seqlens", lambda t, **kw: ck.apply_rope(t.tq, t.tk, None, SPEC, layout="thd",
                                                       cu_seqlens=t.cu.float(), **kw), TypeError,
     "cu_seqlens must be int32 or int64"),
    # shapes
    ("3-D q in bhsd", lambda t, **kw: ck.apply_rope(t.q[0], t.k, t.pos, SPEC, **kw), ValueError, "q must be 4-D"),
    ("different seq", lambda t, **kw: ck.apply_rope(t.q, t.k[:, :, :3], t.pos, SPEC, **kw), ValueError,
     "same batch/sequence"),
    ("different head_dim", lambda t, **kw: ck.apply_rope(t.q, t.k[..., :16], t.pos, RopeSpec.from_params(16), **kw),
     ValueError, "same head_dim"),
    ("rotary > head_dim", lambda t, **kw: ck.apply_rope(t.q, t.k, t.pos, RopeSpec.from_params(64), **kw), ValueError,
     "rotary_dim=64"),
    ("inv_freq length", lambda t, **kw: ck.apply_rope(t.q, t.k, t.pos, SPEC.replace(inv_freq=SPEC.inv_freq[:3]),
                                                      **kw), ValueError, "spec.inv_freq must have shape"),
    ("positions too short", lambda t, **kw: ck.apply_rope(t.q, t.k, t.pos[:, :4], SPEC, **kw), ValueError,
     "position_ids must be"),
    ("positions batch 3", lambda t, **kw: ck.apply_rope(t.q, t.k, t.pos[:1].expand(3, 6), SPEC, **kw), ValueError,
     "position_ids must be"),
    ("2-D cu_seqlens", lambda t, **kw: ck.apply_rope(t.tq, t.tk, None, SPEC, layout="thd", cu_seqlens=t.cu[None],
                                                     **kw), ValueError, "cu_seqlens must be 1-D"),
    ("empty cu_seqlens", lambda t, **kw: ck.apply_rope(t.tq, t.tk, None, SPEC, layout="thd", cu_seqlens=t.cu[:0],
                                                       **kw), ValueError, "cu_seqlens must be 1-D"),
    # layout, backend
    ("unknown layout", lambda t, **kw: ck.apply_rope(t.q, t.k, t.pos, SPEC, layout="sbhd", **kw), ValueError,
     "layout must be one of"),
    ("unknown backend", lambda t, backend, **kw: ck.apply_rope(t.q, t.k, t.pos, SPEC, backend="metal", **kw),
     ValueError, "backend must be one of"),
    ("cuda backend on cpu", lambda t, backend, **kw: ck.apply_rope(t.q, t.k, t.pos, SPEC, backend="cuda", **kw),
     RuntimeError, "not usable"),
    ("cu_seqlens with bhsd", lambda t, **kw: ck.apply_rope(t.q, t.k, None, SPEC, cu_seqlens=t.cu, **kw), ValueError,
     "cu_seqlens describes packed sequences"),
    ("thd without ids or cu_seqlens", lambda t, **kw: ck.apply_rope(t.tq, t.tk, None, SPEC, layout="thd", **kw),
     ValueError, "needs position_ids or cu_seqlens"),
    # strides, devices
    ("head dim stride", lambda t, **kw: ck.apply_rope(t.q.transpose(2, 3), t.k.transpose(2, 3), t.pos[:, :4],
                                                      RopeSpec.from_params(6), **kw), ValueError,
     "q: the head dimension must be contiguous"),
    ("positions on meta", lambda t, **kw: ck.apply_rope(t.q, t.k, t.pos.to("meta"), SPEC, **kw), ValueError,
     "position_ids is on meta"),
    ("cu_seqlens on meta", lambda t, **kw: ck.apply_rope(t.tq, t.tk, None, SPEC, layout="thd",
                                                         cu_seqlens=t.cu.to("meta"), **kw), ValueError,
     "cu_seqlens is on meta"),
    # values
    ("negative position", lambda t, **kw: ck.apply_rope(t.q, t.k, t.pos - 50, SPEC, **kw), ValueError,
     "position_ids must be non-negative"),
    ("position 2^24", lambda t, **kw: ck.apply_rope(t.q, t.k, t.pos + 2**24 - 50, SPEC, **kw), ValueError,
     "below 2\\^24"),
    ("position 2^24 dynamic", lambda t, **kw: ck.apply_rope(t.q, t.k, t.pos + 2**24, DYNAMIC, **kw), ValueError,
     "below 2\\^24"),
    ("cu_seqlens past the tokens", lambda t, **kw: ck.apply_rope(t.tq, t.tk, None, SPEC, layout="thd",
                                                                 cu_seqlens=torch.tensor([0, 5, 40]), **kw),
     ValueError, "cu_seqlens must end at q's number of tokens 12, got 40"),
    ("cu_seqlens past the tokens with ids", lambda t, **kw: ck.apply_rope(t.tq, t.tk, t.tpos, SPEC, layout="thd",
                                                                          cu_seqlens=torch.tensor([0, 5, 10**6]),
                                                                          **kw),
     ValueError, "cu_seqlens must end"),
    ("cu_seqlens not from 0", lambda t, **kw: ck.apply_rope(t.tq, t.tk, None, SPEC, layout="thd",
                                                            cu_seqlens=torch.tensor([3, 5, 12]), **kw),
     ValueError, "cu_seqlens must start at 0"),
    ("cu_seqlens decreasing", lambda t, **kw: ck.apply_rope(t.tq, t.tk, None, SPEC, layout="thd",
                                                            cu_seqlens=torch.tensor([0, 7, 5, 12]), **kw),
     ValueError, "cu_seqlens must be non-decreasing"),
]

# In place only: aliasing and autograd's rules, refused before anything is written.
INPLACE_CASES = [
    ("expanded q", lambda t, **kw: ck.apply_rope(t.q[:, :1].expand(2, 2, 6, 32), t.k, t.pos, SPEC, **kw),
     ValueError, "q has elements sharing one memory location"),
    ("expanded k", lambda t, **kw: ck.apply_rope(t.q, t.k[:, :, :1].expand(2, 1, 6, 32), t.pos, SPEC, **kw),
     ValueError, "k has elements sharing"),
    ("overlapping rows of q", lambda t, **kw: ck.apply_rope(t.q.view(-1).as_strided((2, 2, 6, 32), (64, 32, 16, 1)),
                                                            t.k, t.pos, SPEC, **kw),
     ValueError, "q has elements sharing"),
    ("q is k", lambda t, **kw: ck.apply_rope(t.k, t.k, t.pos, SPEC, **kw), ValueError, "q and k share memory"),
    ("q and k overlap, same strides", lambda t, **kw: ck.apply_rope(  # k = rows 3.. of q's first head
        t.q[:, :1], t.q.as_strided((2, 1, 6, 32), t.q.stride(), 3 * 32), t.pos, SPEC, **kw), ValueError,
     "q and k share memory"),
    ("q and k overlap, other strides", lambda t, **kw: ck.apply_rope(  # k = every other row of q
        t.q, t.q.as_strided((2, 1, 6, 32), (384, 32, 64, 1)), t.pos, SPEC, **kw), ValueError,
     "q and k share memory"),
    ("leaf q requires grad", lambda t, **kw: ck.apply_rope(t.q.clone().requires_grad_(), t.k, t.pos, SPEC, **kw),
     ValueError, "q is a leaf tensor that requires grad"),
    ("view of a leaf k", lambda t, **kw: ck.apply_rope(t.q, _view_of_leaf(t.k), t.pos, SPEC, **kw), ValueError,
     "k is a leaf tensor"),
    ("keys alone in place", lambda t, **kw: ck.apply_rope(None, t.k, t.pos, SPEC, **kw), ValueError,
     "inplace=True rotates q and k together"),
]


@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
@pytest.mark.parametrize("what,call,error,message", ROPE_CASES, ids=[c[0] for c in ROPE_CASES])
def test_apply_rope_refuses(what, call, error, message, backend, inplace, tripwire):
    _require(backend)
    _assert_refused(lambda t: call(t, backend=backend, inplace=inplace), _tensors(), error, message)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
@pytest.mark.parametrize("what,call,error,message", INPLACE_CASES, ids=[c[0] for c in INPLACE_CASES])
def test_apply_rope_inplace_refuses(what, call, error, message, backend, tripwire):
    _require(backend)
    _assert_refused(lambda t: call(t, backend=backend, inplace=True), _tensors(), error, message)


def _thd(t, **kw):
    """rope_attention on the packed tensors (cu_seqlens [0, 5, 12] unless given)."""
    kw.setdefault("cu_seqlens", t.cu)
    return ck.rope_attention(kw.pop("q", t.tq), kw.pop("k", t.tk), kw.pop("v", t.tv), kw.pop("ids", None), SPEC,
                             layout="thd", **kw)


def _cu(*values):
    return torch.tensor(values, dtype=torch.int32)


# (id, call(t, backend=...), error class, message)
ATTENTION_CASES = [
    # kinds
    ("v None", lambda t, **kw: ck.rope_attention(t.q, t.k, None, t.pos, SPEC, **kw), TypeError, "v must be a torch"),
    ("spec None", lambda t, **kw: ck.rope_attention(t.q, t.k, t.v, t.pos, None, **kw), TypeError,
     "spec must be a RopeSpec"),
    ("position_ids list", lambda t, **kw: ck.rope_attention(t.q, t.k, t.v, list(range(6)), SPEC, **kw), TypeError,
     "position_ids must be a torch"),
    ("causal None", lambda t, **kw: ck.rope_attention(t.q, t.k, t.v, t.pos, SPEC, causal=None, **kw), TypeError,
     "causal must be a bool"),
    ("softmax_scale string", lambda t, **kw: ck.rope_attention(t.q, t.k, t.v, t.pos, SPEC, softmax_scale="0.1", **kw),
     TypeError, "softmax_scale must be a number"),
    ("softmax_scale NaN", lambda t, **kw: ck.rope_attention(t.q, t.k, t.v, t.pos, SPEC, softmax_scale=NAN, **kw),
     ValueError, "softmax_scale must be finite"),
    # dtypes, shapes, strides
    ("v dtype", lambda t, **kw: ck.rope_attention(t.q, t.k, t.v.half(), t.pos, SPEC, **kw), TypeError,
     "v must have k's dtype"),
    ("v shape", lambda t, **kw: ck.rope_attention(t.q, t.k, t.v[:, :, :3], t.pos, SPEC, **kw), ValueError,
     "v must match k in shape"),
    ("v head dim stride", lambda t, **kw: ck.rope_attention(t.q, t.k, t.v.transpose(2, 3).contiguous().transpose(2, 3),
                                                            t.pos, SPEC, **kw), ValueError,
     "v: the head dimension must be contiguous"),
    ("zero k heads", lambda t, **kw: ck.rope_attention(t.q, t.k[:, :0], t.v[:, :0], t.pos, SPEC, **kw), ValueError,
     "positive multiple of k/v heads \\(0\\)"),
    ("heads not a multiple", lambda t, **kw: ck.rope_attention(t.q[:, :1].expand(2, 3, 6, 32), t.k.expand(2, 2, 6, 32),
                                                               t.v.expand(2, 2, 6, 32), t.pos, SPEC, **kw),
     ValueError, "q heads \\(3\\) must be a positive multiple"),
    ("unrotated keys longer", lambda t, **kw: ck.rope_attention(t.q[:, :, :4], t.k, t.v, t.pos[:, :4], SPEC, **kw),
     ValueError, "same batch/sequence"),
    ("rotated keys shorter", lambda t, **kw: ck.rope_attention(t.q, t.k[:, :, :4], t.v[:, :, :4], t.pos, SPEC,
                                                               k_rotated=True, **kw), ValueError,
     "at least its sequence length"),
    ("unknown layout", lambda t, **kw: ck.rope_attention(t.q, t.k, t.v, t.pos, SPEC, layout="hsd", **kw), ValueError,
     "layout must be one of"),
    # metadata
    ("cu_seqlens with bhsd", lambda t, **kw: ck.rope_attention(t.q, t.k, t.v, None, SPEC, cu_seqlens=t.cu, **kw),
     ValueError, "layout='thd'"),
    ("cu_seqlens int8", lambda t, **kw: _thd(t, cu_seqlens=t.cu.to(torch.int8), **kw), TypeError,
     "cu_seqlens must be int32 or int64"),
    ("cu_seqlens on meta", lambda t, **kw: _thd(t, cu_seqlens=t.cu.to("meta"), **kw), ValueError,
     "cu_seqlens is on meta"),
    ("empty cu_seqlens", lambda t, **kw: _thd(t, cu_seqlens=_cu(), **kw), ValueError, "cu_seqlens must be 1-D"),
    ("cu_seqlens past the tokens", lambda t, **kw: _thd(t, cu_seqlens=_cu(0, 5, 40), **kw), ValueError,
     "cu_seqlens must end at q's number of tokens 12, got 40"),
    ("cu_seqlens far past the tokens", lambda t, **kw: _thd(t, cu_seqlens=_cu(0, 5, 10**6), **kw), ValueError,
     "cu_seqlens must end"),
    ("cu_seqlens far past, with ids", lambda t, **kw: _thd(t, cu_seqlens=_cu(0, 5, 10**6), ids=t.tpos, **kw),
     ValueError, "cu_seqlens must end"),
    ("negative cu_seqlens, with ids", lambda t, **kw: _thd(t, cu_seqlens=_cu(0, -5, 12), ids=t.tpos, **kw),
     ValueError, "cu_seqlens must be non-decreasing"),
    ("cu_seqlens from 3, with ids", lambda t, **kw: _thd(t, cu_seqlens=_cu(3, 5, 12), ids=t.tpos, **kw), ValueError,
     "cu_seqlens must start at 0"),
    ("cu_seqlens_k without k_rotated", lambda t, **kw: _thd(t, cu_seqlens_k=t.cu, **kw), ValueError,
     "pass k_rotated=True"),
    ("cu_seqlens_k without cu_seqlens", lambda t, **kw: _thd(t, cu_seqlens=None, cu_seqlens_k=t.cu, ids=t.tpos,
                                                             k_rotated=True, **kw), ValueError,
     "cu_seqlens_k needs cu_seqlens"),
    ("cu_seqlens_k other count", lambda t, **kw: _thd(t, cu_seqlens_k=_cu(0, 5, 8, 12), k_rotated=True, **kw),
     ValueError, "as many sequences"),
    ("cu_seqlens_k past the keys", lambda t, **kw: _thd(t, cu_seqlens_k=_cu(0, 5, 40), k_rotated=True, **kw),
     ValueError, "cu_seqlens_k must end at k's number of tokens 12, got 40"),
    ("cu_seqlens_k from 2", lambda t, **kw: _thd(t, cu_seqlens_k=_cu(2, 5, 12), k_rotated=True, **kw), ValueError,
     "cu_seqlens_k must start at 0"),
    ("fewer keys than queries", lambda t, **kw: _thd(t, q=t.tq[:9], cu_seqlens=_cu(0, 7, 9), cu_seqlens_k=t.cu,
                                                     k_rotated=True, **kw), ValueError,
     "at least as many keys as queries"),
    ("cu_seqlens_k int64 list", lambda t, **kw: _thd(t, cu_seqlens_k=[0, 5, 12], k_rotated=True, **kw), TypeError,
     "cu_seqlens_k must be a torch"),
    ("negative position", lambda t, **kw: ck.rope_attention(t.q, t.k, t.v, -t.pos - 1, SPEC, **kw), ValueError,
     "position_ids must be non-negative"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("what,call,error,message", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_rope_attention_refuses(what, call, error, message, backend, tripwire):
    _require(backend)
    _assert_refused(lambda t: call(t, backend=backend), _tensors(), error, message)


COS_SIN_CASES = [
    ("position_ids list", lambda t: ck.rope_cos_sin([0, 1, 2], SPEC), TypeError, "position_ids must be a torch"),
    ("float positions", lambda t: ck.rope_cos_sin(t.pos.float(), SPEC), TypeError, "position_ids must be an integer"),
    ("spec None", lambda t: ck.rope_cos_sin(t.pos, None), TypeError, "spec must be a RopeSpec"),
    ("int32 tables", lambda t: ck.rope_cos_sin(t.pos, SPEC, dtype=torch.int32), TypeError, "dtype must be float32"),
    ("negative position", lambda t: ck.rope_cos_sin(-t.pos - 1, SPEC), ValueError, "non-negative"),
]

SPEC_CASES = [  # the parameter classes; tests/test_spec.py goes through every key in both config spellings
    ("NaN theta", lambda t: RopeSpec.from_params(32, NAN), ValueError, "'rope_theta'"),
    ("inf factor", lambda t: RopeSpec.from_params(32, rope_type="linear", factor=float("inf")), ValueError,
     "'factor'"),
    ("factor zero", lambda t: RopeSpec.from_params(32, rope_type="yarn", factor=0.0), ValueError, "'factor'"),
    ("partial rotary zero", lambda t: RopeSpec.from_params(32, partial_rotary_factor=0.0), ValueError,
     "'partial_rotary_factor'"),
    ("factor string", lambda t: RopeSpec.from_params(32, rope_type="linear", factor="4"), TypeError, "'factor'"),
    ("head_dim zero", lambda t: RopeSpec.from_params(0), ValueError, "head_dim must be a positive integer"),
    ("unknown angle", lambda t: RopeSpec.from_params(32, angle="fp16"), ValueError, "angle must be one of"),
]


@pytest.mark.parametrize("what,call,error,message", COS_SIN_CASES + SPEC_CASES,
                         ids=[c[0] for c in COS_SIN_CASES + SPEC_CASES])
def test_tables_and_specs_refuse(what, call, error, message):
    _assert_refused(call, _tensors(), error, message)


# --------------------------------------------------------------------------------------- the valid edge cases
@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_default_positions_cover_every_batch_row(backend):
    """position_ids=None is 0..S-1 for every row of a batch (the Triton kernel used to read past a [1, S] row, the
    host build refused the call)."""
    _require(backend)
    t = _tensors()
    q, k = t.q[:, :, :5], t.k[:, :, :5]
    ids = torch.arange(5).expand(2, 5)
    for got, x in zip(ck.apply_rope(q, k, None, SPEC, backend=backend), (q, k)):
        expected = rope_oracle(x.transpose(1, 2), ids, SPEC.inv_freq)
        assert_close_to_oracle(got.transpose(1, 2), expected, torch.float32, backend)
    if backend != "cpu":
        out = ck.rope_attention(q, k, t.v[:, :, :5], None, SPEC, backend=backend)
        torch.testing.assert_close(out, ck.rope_attention(q, k, t.v[:, :, :5], ids, SPEC, backend=backend),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_empty_inputs_give_empty_outputs(backend):
    _require(backend)
    cases = [  # (q, k, position_ids, keyword arguments)
        (torch.randn(2, 2, 0, 32), torch.randn(2, 1, 0, 32), None, {}),
        (torch.randn(0, 2, 5, 32), torch.randn(0, 1, 5, 32), torch.arange(5), {}),
        (torch.randn(2, 0, 5, 32), torch.randn(2, 0, 5, 32), None, {}),
        (torch.randn(0, 2, 32), torch.randn(0, 1, 32), None, dict(layout="thd", cu_seqlens=torch.tensor([0]))),
        (torch.randn(2, 2, 0, 32), torch.randn(2, 1, 0, 32), None, dict(inplace=True)),
    ]
    for q, k, ids, kw in cases:
        for spec in (SPEC, DYNAMIC):
            q_rot, k_rot = ck.apply_rope(q, k, ids, spec, backend=backend, **kw)
            assert q_rot.shape == q.shape and k_rot.shape == k.shape
    cos, sin = ck.rope_cos_sin(torch.zeros(0, dtype=torch.int64), SPEC)
    assert cos.shape == sin.shape == (0, 32)
    if backend != "cpu":
        for q, k, cu in ((torch.randn(2, 2, 0, 32), torch.randn(2, 1, 0, 32), None),
                         (torch.randn(0, 2, 32), torch.randn(0, 1, 32), _cu(0)),
                         (torch.randn(5, 2, 32), torch.randn(5, 1, 32), _cu(0, 0, 5, 5))):  # empty sequences
            layout = "bhsd" if cu is None else "thd"
            out = ck.rope_attention(q, k, k.clone(), None, SPEC, layout=layout, cu_seqlens=cu, backend=backend)
            assert out.shape == q.shape and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_inplace_views_of_one_buffer(backend):
    """q and k sliced out of one projection (transformers' fused qkv) rotate in place; views whose rows interleave
    without touching (other strides) too. Both equal the out-of-place result."""
    _require(backend)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1000, (2, 6), generator=g)
    qkv = torch.randn(2, 6, 5, 32, generator=g)  # bshd: 2 q heads, 1 k head, 2 more heads
    two_heads = torch.randn(2, 6, 2, 32, generator=g)
    pairs = [(qkv[:, :, :2], qkv[:, :, 2:3]),  # same strides: the index-box test decides
             (two_heads[:, :3, :1], two_heads[:, 1::2, 1:])]  # other strides: the row scan decides
    for q, k in pairs:
        want = ck.apply_rope(q, k, ids[:, :q.shape[1]], SPEC, layout="bshd", backend=backend)
        got = ck.apply_rope(q, k, ids[:, :q.shape[1]], SPEC, layout="bshd", backend=backend, inplace=True)
        assert got[0].data_ptr() == q.data_ptr()
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


class _DataReads:
    """Counts reads of tensor data to the host (the syncs of a GPU run) through the Python-level conversions."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original):
        def read(tensor, *args):
            self.count += 1
            return original(tensor, *args)
        return read


@pytest.mark.parametrize("check", [True, False])
def test_value_checks_read_data_once_or_never(check, monkeypatch, tripwire):
    """Every value check of a call shares one read of data (one host sync on a GPU); check_positions=False reads
    none (then only a dynamic rope type reads its largest position)."""
    t = _tensors()
    calls = [
        lambda: ck.apply_rope(t.q, t.k, t.pos, SPEC, backend="torch", check_positions=check),
        lambda: ck.apply_rope(t.tq, t.tk, None, SPEC, layout="thd", cu_seqlens=t.cu, backend="torch",
                              check_positions=check),
        lambda: ck.apply_rope(t.q, t.k, t.pos, DYNAMIC, backend="torch", check_positions=check),
        lambda: _thd(t, cu_seqlens_k=t.cu, k_rotated=True, backend="torch", check_positions=check),
        lambda: _thd(t, ids=t.tpos, backend="torch", check_positions=check),
    ]
    reads = _DataReads(monkeypatch)
    for i, call in enumerate(calls):
        reads.count = 0
        with pytest.raises(AssertionError, match="kernel was launched"):  # the tripwire: checks passed
            call()
        assert reads.count == (1 if check or i == 2 else 0), f"call {i}: {reads.count} reads"
