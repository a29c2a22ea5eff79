"""The (cos, sin) of a patched rotary module is the stock (cos, sin) to every reader, the fused path takes only the
untouched pair, torch.compile traces the patched model whole, and the rotary path never waits on the host.

The oracle is stock transformers' rotary module built from the same config, and the properties transformers' own
`test_model_rope_scaling_frequencies` checks (restated here, not copied): a linear factor f maps position p to p / f,
dynamic NTK leaves a short input alone and slows every frequency for a long one, YaRN scales every position.
"""

import copy
import importlib
import io
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from ctxext_kernels.integrations import FAMILIES, fused_rope_of, patch, rotary, unpatch  # noqa: E402
from ctxext_kernels.ops.rope import apply_rope  # noqa: E402
from tiny_models import VOCAB, build, tiny_config  # noqa: E402

FACTOR = 10
SHORT, LONG = 10, 192  # LONG = 1.5 x the tiny models' max_position_embeddings (128)
ROPES = {"default": dict(rope_type="default"), "linear": dict(rope_type="linear", factor=float(FACTOR)),
         "dynamic": dict(rope_type="dynamic", factor=float(FACTOR)),
         "yarn": dict(rope_type="yarn", factor=float(FACTOR)),
         "partial": dict(rope_type="linear", factor=2.0, partial_rotary_factor=0.5)}
CASES = [(family, rope) for family in sorted(FAMILIES) for rope in ROPES] + [("phi3", "longrope")]


@pytest.fixture(autouse=True)
def stock_afterwards():
    unpatch()
    yield
    unpatch()


def rotary_class(family: str) -> type:
    family = FAMILIES[family]
    return getattr(importlib.import_module(family.module_name), family.rotary_class)


def rope_config(family: str, rope: str):
    return tiny_config(family) if rope == "longrope" else tiny_config(family, **ROPES[rope])  # phi3's own: LongRoPE


def tables(family: str, rope: str, patched: bool, dtype=torch.float32) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(cos, sin) of a fresh rotary module for a short, a long and again the short input (dynamic NTK grows, then
    resets), stock or patched."""
    if patched:
        patch([family])
    module = rotary_class(family)(config=rope_config(family, rope))
    x = torch.zeros(1, dtype=dtype)
    out = {name: module(x, torch.arange(length)[None])
           for name, length in (("short", SHORT), ("long", LONG), ("short again", SHORT))}
    out["inv_freq"] = module.inv_freq.clone()
    unpatch()
    return out


@pytest.mark.parametrize("family,rope", CASES, ids=[f"{family}-{rope}" for family, rope in CASES])
def test_rotary_output_reads_like_stock(family, rope):
    stock, ours = tables(family, rope, patched=False), tables(family, rope, patched=True)
    torch.testing.assert_close(ours["inv_freq"], stock["inv_freq"])
    for name in ("short", "long", "short again"):
        assert fused_rope_of(*ours[name]) is not None
        for got, want in zip(ours[name], stock[name]):
            assert type(got) is torch.Tensor
            assert (got.shape, got.dtype, got.device) == (want.shape, want.dtype, want.device)
            torch.testing.assert_close(got, want)  # fp32 defaults: exact angles vs stock's fp32 product
            torch.testing.assert_close(got[:, -1], want[:, -1])
            torch.testing.assert_close(got[0, 3:7, ::2], want[0, 3:7, ::2])
            assert bool(torch.isclose(got, want, atol=1e-5).all())
    if rope not in ("dynamic", "longrope"):  # frequencies fixed: a slice of the long table is the short table
        for got_long, got_short in zip(ours["long"], ours["short"]):
            assert torch.equal(got_long[:, :SHORT], got_short)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scaling_properties_on_the_patched_tables(family):
    """What transformers checks of its rotary modules, on ours."""
    default, linear, dynamic, yarn = (tables(family, rope, patched=True) for rope in ("default", "linear", "dynamic",
                                                                                      "yarn"))
    for part in (0, 1):  # cos, sin
        # linear: position p of the scaled model is position p / FACTOR of the original one
        for position in range(0, LONG, FACTOR):
            torch.testing.assert_close(linear["long"][part][:, position], default["long"][part][:, position // FACTOR])
        # dynamic NTK: short inputs untouched; a long one slows every frequency
        torch.testing.assert_close(dynamic["short"][part], default["short"][part])
        assert not torch.allclose(dynamic["long"][part], default["long"][part], atol=1e-5)
        # YaRN: every position moves
        for length in ("short", "long"):
            assert not torch.allclose(yarn[length][part], default[length][part], atol=1e-5)
    assert bool((dynamic["inv_freq"] <= default["inv_freq"] * (1 + torch.finfo(torch.float32).eps)).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tables_move_copy_save_and_print_like_plain_tensors(dtype):
    cos, sin = tables("llama", "default", patched=True, dtype=dtype)["long"]
    plain = cos.clone()  # the same values, no FusedRope
    assert fused_rope_of(plain, sin) is None
    for moved in (cos.to(torch.float64), cos.to("meta"), cos.cpu(), cos.contiguous(), cos.detach(), cos.float()):
        assert type(moved) is torch.Tensor and moved.shape == cos.shape
        if moved.device.type != "meta":
            torch.testing.assert_close(moved.to(dtype), plain)
    assert repr(cos) == repr(plain) and str(cos) == str(plain)
    torch.testing.assert_close(copy.deepcopy(cos), plain)
    torch.testing.assert_close(pickle.loads(pickle.dumps(cos)), plain)
    saved, saved_plain = io.BytesIO(), io.BytesIO()
    torch.save(cos, saved)
    torch.save(plain, saved_plain)
    assert saved.getvalue() == saved_plain.getvalue()  # nothing of the FusedRope is written
    saved.seek(0)
    loaded = torch.load(saved, weights_only=True)
    assert type(loaded) is torch.Tensor and not loaded.__dict__ and torch.equal(loaded, plain)


def qk(seq: int = LONG):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, seq, 16, generator=generator), torch.randn(1, 2, seq, 16, generator=generator)


def test_fused_kernel_only_for_the_untouched_pair(monkeypatch):
    """The fused kernel rotates by positions: it may stand in for the tables only while they are the ones the
    rotary module returned. Anything else (a copy, a slice, a pair from two calls, an in-place edit, tables that
    need gradients) goes through the stock formula on the actual values."""
    from transformers.models.llama import modeling_llama

    stock_apply = modeling_llama.apply_rotary_pos_emb
    calls = []

    def counting_apply_rope(*args, **kwargs):
        calls.append(1)
        return apply_rope(*args, **kwargs)

    monkeypatch.setattr(rotary, "apply_rope", counting_apply_rope)
    cos, sin = tables("llama", "default", patched=True)["long"]
    other_sin = tables("llama", "default", patched=True)["long"][1]
    edited_cos, edited_sin = tables("llama", "default", patched=True)["long"]
    grad_cos, grad_sin = (t.requires_grad_() for t in tables("llama", "default", patched=True)["long"])
    patch(["llama"])
    patched_apply = modeling_llama.apply_rotary_pos_emb
    q, k = qk()

    def check(q, k, cos, sin, fused: bool):
        calls.clear()
        got = patched_apply(q, k, cos, sin)
        want = stock_apply(q, k, cos, sin)
        assert len(calls) == int(fused)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        return got

    check(q, k, cos, sin, fused=True)
    check(q, k, cos.clone(), sin.clone(), fused=False)
    check(q, k, cos, other_sin, fused=False)  # a pair from two calls
    q10, k10 = qk(SHORT)
    check(q10, k10, cos[:, :SHORT], sin[:, :SHORT], fused=False)
    edited_cos.mul_(0.5)  # an in-place edit is honoured
    check(q, k, edited_cos, edited_sin, fused=False)
    got = check(q, k, grad_cos, grad_sin, fused=False)
    sum(x.square().sum() for x in got).backward()
    stock_cos, stock_sin = (t.detach().clone().requires_grad_() for t in (grad_cos, grad_sin))
    sum(x.square().sum() for x in stock_apply(q, k, stock_cos, stock_sin)).backward()
    torch.testing.assert_close(grad_cos.grad, stock_cos.grad)
    torch.testing.assert_close(grad_sin.grad, stock_sin.grad)


def test_edited_tables_are_refused_under_the_fused_attention():
    """attn_implementation="ctxext" rotates inside the attention kernel by positions: an edit it cannot honour is an
    error, not a silent double (or missing) rotation."""
    config = tiny_config("llama")
    config._attn_implementation = "ctxext"
    patch(["llama"])
    from transformers.models.llama import modeling_llama
    cos, sin = modeling_llama.LlamaRotaryEmbedding(config=config)(torch.zeros(1), torch.arange(8)[None])
    q, k = qk(8)
    assert modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)[0] is q  # untouched: handed over unrotated
    cos.mul_(2.0)
    with pytest.raises(RuntimeError, match="cannot honour cos/sin tables edited in place"):
        modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)


@pytest.mark.parametrize("family", ["llama", "phi3"])  # phi3: partial rotary + LongRoPE's on-device choice
def test_torch_compile_fullgraph_forward_and_backward(family):
    """One graph (fullgraph=True: any graph break raises), the fused op in it, and no cos/sin left in the compiled
    forward: nothing reads the tables, so the compiler drops them."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    model = build(family)
    input_ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(8))
    patch([family])
    model.zero_grad()
    eager = model(input_ids, labels=input_ids)
    eager.loss.backward()
    eager_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    forward_graphs = []

    def backend(graph_module, example_inputs):
        def forward_compiler(graph, _):
            forward_graphs.append(graph)
            return make_boxed_func(graph.forward)
        return aot_module_simplified(graph_module, example_inputs, fw_compiler=forward_compiler,
                                     bw_compiler=lambda graph, _: make_boxed_func(graph.forward))

    torch._dynamo.reset()
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend=backend)(input_ids, labels=input_ids)
    compiled.loss.backward()
    assert len(forward_graphs) == 1
    ops = [str(node.target) for node in forward_graphs[0].graph.nodes if node.op == "call_function"]
    assert ops.count("ctxext.rope.default") == model.config.num_hidden_layers
    assert not [op for op in ops if op in ("aten.cos.default", "aten.sin.default")]
    torch.testing.assert_close(compiled.logits, eager.logits)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)


class HostSync(TorchDispatchMode):
    """Raises on every operator that makes the host wait for a tensor's values: `.item()` and what calls it (bool,
    int, float), and operators whose output shape depends on the data (nonzero, masked_select, ...)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if (func is torch.ops.aten._local_scalar_dense.default or torch.Tag.dynamic_output_shape in func.tags
                or torch.Tag.data_dependent_output in func.tags):
            raise AssertionError(f"host sync: {func}")
        return func(*args, **(kwargs or {}))


def no_host_sync(monkeypatch):
    """HostSync, plus the Python methods that read values on the host (inside custom ops the mode is off)."""
    for method in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, method,
                            lambda self, *args, _name=method, **kwargs: pytest.fail(f"host sync: Tensor.{_name}"))
    return HostSync()


@pytest.mark.parametrize("family,rope", [("llama", "default"), ("llama", "yarn"), ("phi3", "longrope")])
def test_training_step_never_syncs_with_the_host(family, rope, monkeypatch):
    """Forward and backward of a patched model: no value crosses to the host (LongRoPE picks its factors on the
    device)."""
    model = build(family) if rope == "longrope" else build(family, **ROPES[rope])
    model.train()
    patch([family])
    # Beyond LongRoPE's original window (16), so the long factors are picked on the device.
    input_ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():  # the first call builds and checks each module's RopeSpec once, on the CPU (no device)
        model(input_ids)
    with monkeypatch.context() as scope, no_host_sync(scope):
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_dynamic_ntk_is_the_one_rope_type_that_syncs(monkeypatch):
    """Its frequencies follow the longest sequence seen (a host-side state), as in stock transformers."""
    model = build("llama", **ROPES["dynamic"])
    patch(["llama"])
    input_ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(10))
    with monkeypatch.context() as scope, no_host_sync(scope), pytest.raises(BaseException, match="host sync"):
        model(input_ids)
