"""The RoPE op's contract beyond numerics: opcheck, torch.compile, transformers-style tables, backend reports. (Bad
input: tests/test_bad_inputs.py.)"""

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
    torch.library.opcheck(torch.ops.ctxext.rope_keys.default, (k.detach().clone().requires_grad_(), *args))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_torch_compile_fullgraph(backend):
    if not _usable(backend):
        pytest.skip(ck.backends("cpu")[backend][1])
    q, k = _qk()
    pos = torch.randint(0, 1000, (2, 5))
    want = ck.apply_rope(q, k, pos, SPEC, backend=backend)
    for inplace in (False, True):  # in place, the checks that read memory addresses step aside while tracing
        compiled = torch.compile(lambda q, k, p: ck.apply_rope(q, k, p, SPEC, backend=backend, inplace=inplace),
                                 fullgraph=True)
        for got, expected in zip(compiled(q.clone(), k.clone(), pos), want):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


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


def test_backends_report_reasons():
    report = ck.backends("cpu")
    assert set(report) == {"cuda", "triton", "cpu", "torch"}
    assert report["torch"][0] is True
    assert not report["cuda"][0] and report["cuda"][1]
