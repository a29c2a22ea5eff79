"""The RoPE op's contract beyond numerics: opcheck, torch.compile, transformers-style tables, and clear errors that
leave the caller's tensors untouched."""

import pytest
import torch

import ctxext_kernels as ck
from ctxext_kernels.ops.spec import RopeSpec

SPEC = RopeSpec.from_params(32, 10000.0)


def _qk(dtype=torch.float32, seq=5):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, seq, 32, generator=g).to(dtype), torch.randn(2, 1, seq, 32, generator=g).to(dtype)


def _usable(backend):
    return ck.backends("cpu")[backend][0]


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_opcheck(backend):
    if not _usable(backend):
        pytest.skip(ck.backends("cpu")[backend][1])
    q, k = _qk()
    pos = torch.randint(0, 1000, (2, 5))
    args = (pos, SPEC.inv_freq, 1.25, "bhsd", False, False, True, backend)
    torch.library.opcheck(torch.ops.ctxext.rope.default, (q.requires_grad_(), k.requires_grad_(), *args))
    torch.library.opcheck(torch.ops.ctxext.rope_.default, (q.detach().clone(), k.detach().clone(), *args))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_torch_compile_fullgraph(backend):
    if not _usable(backend):
        pytest.skip(ck.backends("cpu")[backend][1])
    q, k = _qk()
    pos = torch.randint(0, 1000, (2, 5))
    compiled = torch.compile(lambda q, k, p: ck.apply_rope(q, k, p, SPEC, backend=backend), fullgraph=True)
    for got, want in zip(compiled(q, k, pos), ck.apply_rope(q, k, pos, SPEC, backend=backend)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_rope_cos_sin_matches_transformers_tables():
    """Same table shape and values as transformers' rotary module (its fp32 product is exact below 2^11 * ...)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=4096)
    spec = RopeSpec.from_hf_config(config)
    pos = torch.arange(4096)[None]
    cos_hf, sin_hf = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), pos)
    for angle, atol in (("exact", 2e-3), ("fp32", 1e-6)):  # transformers' fp32 product loses ~1e-3 rad near 4096
        cos, sin = ck.rope_cos_sin(pos, spec.replace(angle=angle))
        assert cos.shape == cos_hf.shape == (1, 4096, 64)
        torch.testing.assert_close(cos, cos_hf, rtol=0, atol=atol)
        torch.testing.assert_close(sin, sin_hf, rtol=0, atol=atol)


def test_rope_cos_sin_dtype_and_scaling():
    spec = RopeSpec.from_params(32, rope_type="yarn", factor=4.0, original_max_position_embeddings=64,
                                max_position_embeddings=256)
    cos, sin = ck.rope_cos_sin(torch.tensor([0, 7]), spec, dtype=torch.bfloat16)
    assert cos.dtype == torch.bfloat16 and cos.shape == (2, 32)
    assert cos[0, 0].item() == pytest.approx(spec.attention_scaling, rel=2**-8)


BAD_CALLS = [  # (description, call taking q, k and apply_rope's keyword arguments, expected message)
    ("float positions", lambda q, k, **kw: ck.apply_rope(q, k, torch.zeros(2, 5), SPEC, **kw), "integer tensor"),
    ("negative position", lambda q, k, **kw: ck.apply_rope(q, k, torch.tensor([0, 1, -3, 2, 4]), SPEC, **kw),
     "non-negative"),
    ("position 2^24", lambda q, k, **kw: ck.apply_rope(q, k, torch.tensor([0, 1, 2**24, 2, 4]), SPEC, **kw),
     "below 2\\^24"),
    ("wrong position length", lambda q, k, **kw: ck.apply_rope(q, k, torch.arange(4), SPEC, **kw),
     "position_ids must be"),
    ("int q", lambda q, k, **kw: ck.apply_rope(q.long(), k, None, SPEC, **kw), "q must be float32, float16 or bf"),
    ("mixed dtypes", lambda q, k, **kw: ck.apply_rope(q, k.half(), None, SPEC, **kw), "same dtype"),
    ("3-D q in bhsd", lambda q, k, **kw: ck.apply_rope(q[0], k, None, SPEC, **kw), "q must be 4-D"),
    ("different seq", lambda q, k, **kw: ck.apply_rope(q, k[:, :, :3], None, SPEC, **kw), "same batch/sequence"),
    ("head dim stride", lambda q, k, **kw: ck.apply_rope(q.transpose(2, 3), k.transpose(2, 3), None,
                                                         RopeSpec.from_params(4), **kw),
     "head dimension must be contiguous"),
    ("rotary > head", lambda q, k, **kw: ck.apply_rope(q, k, None, RopeSpec.from_params(64), **kw), "rotary_dim=64"),
    ("unknown layout", lambda q, k, **kw: ck.apply_rope(q, k, None, SPEC, layout="sbhd", **kw),
     "layout must be one of"),
    ("unknown backend", lambda q, k, **kw: ck.apply_rope(q, k, None, SPEC, backend="metal", **kw),
     "backend must be one of"),
    ("cuda backend on cpu", lambda q, k, **kw: ck.apply_rope(q, k, None, SPEC, backend="cuda", **kw), "not usable"),
    ("positions on meta", lambda q, k, **kw: ck.apply_rope(q, k, torch.arange(5, device="meta"), SPEC, **kw),
     "is on meta"),
    ("thd without ids", lambda q, k, **kw: ck.apply_rope(q[0].transpose(0, 1), k[0].transpose(0, 1), None, SPEC,
                                                         layout="thd", **kw), "needs position_ids"),
    ("bad cu_seqlens", lambda q, k, **kw: ck.apply_rope(q[0].transpose(0, 1), k[0].transpose(0, 1), None, SPEC,
                                                        layout="thd", cu_seqlens=torch.tensor([0, 3, 2, 5]), **kw),
     "non-decreasing"),
]


@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
@pytest.mark.parametrize("what,call,message", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_is_named_and_writes_nothing(what, call, message, inplace):
    q, k = _qk()
    q_before, k_before = q.clone(), k.clone()
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
        call(q, k, inplace=inplace)
    assert torch.equal(q, q_before) and torch.equal(k, k_before)


def test_backends_report_reasons():
    report = ck.backends("cpu")
    assert set(report) == {"cuda", "triton", "cpu", "torch"}
    assert report["torch"][0] is True
    assert not report["cuda"][0] and report["cuda"][1]
