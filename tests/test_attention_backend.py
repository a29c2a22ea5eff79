"""`attn_implementation="ctxext"` (keys rotated by the RoPE op, queries inside the attention kernel) vs stock
transformers with sdpa/eager on tiny random models (CPU, fp32): training forward and backward, padding, the
attention function itself, what it refuses, and that the training path never syncs with the host. Generation:
test_ctxext_generate.py."""

import contextlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import tiny_config  # noqa: E402

from ctxext_kernels.integrations import patch, unpatch  # noqa: E402
from ctxext_kernels.integrations.attention_backend import ATTN_IMPLEMENTATION  # noqa: E402
from ctxext_kernels.ops.spec import RopeSpec  # noqa: E402

VOCAB = 97


@pytest.fixture(autouse=True)
def stock_afterwards():
    unpatch()
    yield
    unpatch()


def tiny_llama(attn_implementation: str, **rope):
    """2 layers, 4 q heads / 2 kv heads of 16 dims; `rope` adds scaling parameters."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      attn_implementation="sdpa")
    if rope:
        if hasattr(config, "rope_parameters"):
            config.rope_parameters = {"rope_theta": 10000.0, **rope}
        else:  # transformers 4.57
            config.rope_scaling = rope
    model = transformers.LlamaForCausalLM(config).eval()
    model.config._attn_implementation = attn_implementation
    return model


def run(model, input_ids, position_ids):
    model.zero_grad()
    out = model(input_ids, position_ids=position_ids, labels=input_ids)
    out.loss.backward()
    return out.logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


POSITIONS = {
    "contiguous": torch.arange(12).expand(2, 12),
    "pose skip": torch.tensor([[0, 1, 2, 3, 4, 40, 41, 42, 43, 44, 45, 46]] * 2),
    "packed": torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]]),
}


@pytest.mark.parametrize("case", sorted(POSITIONS))
@pytest.mark.parametrize("rope", [{}, {"rope_type": "linear", "factor": 4.0}], ids=["default", "linear"])
def test_matches_stock_sdpa(case, rope, monkeypatch):
    position_ids = POSITIONS[case]
    input_ids = torch.randint(0, VOCAB, position_ids.shape, generator=torch.Generator().manual_seed(1))
    stock_model = tiny_llama("sdpa", **rope)
    if case == "packed":  # stock sdpa attends across sequences: give it the block-diagonal mask itself
        seg = torch.tensor([0] * 5 + [1] * 3 + [2] * 4)
        mask = (seg[:, None] == seg[None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
        stock_model.config._attn_implementation = "eager"
        stock = _run_with_mask(stock_model, input_ids, position_ids, mask)
    else:
        stock = run(stock_model, input_ids, position_ids)
    patch(["llama"])
    model = tiny_llama(ATTN_IMPLEMENTATION, **rope)
    with monkeypatch.context() as scope:  # keys by the RoPE op, queries in the attention kernel: never stock RoPE
        scope.setattr(transformers.models.llama.modeling_llama, "rotate_half", lambda x: pytest.fail("stock RoPE"))
        got = run(model, input_ids, position_ids)
    torch.testing.assert_close(got[0], stock[0], atol=2e-5, rtol=2e-5)
    for name in stock[1]:
        torch.testing.assert_close(got[1][name], stock[1][name], atol=2e-5, rtol=1e-4, msg=name)


def _run_with_mask(model, input_ids, position_ids, mask):
    """Stock eager attention with an explicit boolean mask `[S, S]` (True = attend)."""
    model.zero_grad()
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)[None, None]
    out = model(input_ids, position_ids=position_ids, attention_mask=additive, labels=input_ids)
    out.loss.backward()
    return out.logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_unpatched_model_is_refused():
    """Without the patch the model's own RoPE would rotate q and k before the kernel does: a named error."""
    patch(["llama"])  # registers the attention function
    unpatch()
    model = tiny_llama(ATTN_IMPLEMENTATION)
    with pytest.raises(RuntimeError, match="needs the ctxext model patch"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_from_pretrained_accepts_the_implementation(tmp_path):
    """`from_pretrained(..., attn_implementation="ctxext")` once the patch registered it; same logits as the patched
    model with sdpa (RoPE then attention as two steps)."""
    tiny_llama("sdpa").save_pretrained(tmp_path)
    patch(["llama"])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=ATTN_IMPLEMENTATION)
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, stock(input_ids).logits, atol=2e-5, rtol=2e-5)


def build(family: str, attn_implementation: str, rope: dict | None = None, **overrides):
    """A tiny model of `family` (test_integration_families.tiny_config, `rope`: rope parameters) with config
    overrides."""
    config = tiny_config(family, **(rope or {}))
    for name, value in overrides.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.config._attn_implementation = attn_implementation
    return model


def padded(lengths=(6, 5), total=9, side="left"):
    """(input_ids, attention_mask) `[len(lengths), total]`, row i holding lengths[i] tokens at its `side` end."""
    input_ids = torch.randint(3, VOCAB, (len(lengths), total), generator=torch.Generator().manual_seed(4))
    slot = torch.arange(total) if side == "right" else torch.arange(total - 1, -1, -1)
    attention_mask = (slot < torch.tensor(lengths)[:, None]).long()
    return input_ids * attention_mask, attention_mask


def masked_run(model, input_ids, attention_mask):
    """Logits at the tokens and every gradient of a padded batch (padding left out of the loss)."""
    model.zero_grad()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    out = model(input_ids, attention_mask=attention_mask, labels=labels)
    out.loss.backward()
    return out.logits.detach()[attention_mask.bool()], {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_run(got, want):
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=2e-5)
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], atol=2e-5, rtol=1e-4, msg=name)


DYNAMIC_NTK = {"max_position_embeddings": 4, "rope": dict(rope_type="dynamic", factor=2.0)}


@pytest.mark.parametrize("family,overrides,side", [
    ("llama", {}, "left"),
    # 9 key slots, but no row holds more than 6 tokens: the window cuts nothing off
    ("mistral", {"sliding_window": 6}, "left"),
    ("gemma2", {"attn_logit_softcapping": None}, "left"),  # sliding layers (window 4096) and full layers
    # the padding holds the largest positions: queries and keys take the frequencies of all of them, as stock does
    ("llama", DYNAMIC_NTK, "right"),
], ids=["llama", "mistral-window", "gemma2-no-softcap", "llama-dynamic-ntk-right-padded"])
def test_padded_batch_training_matches_sdpa(family, overrides, side):
    """A padded batch (unpadded to packed sequences inside): logits at the tokens and all gradients as sdpa."""
    input_ids, attention_mask = padded(side=side)
    want = masked_run(build(family, "sdpa", **overrides), input_ids, attention_mask)
    patch([family])
    assert_same_run(masked_run(build(family, ATTN_IMPLEMENTATION, **overrides), input_ids, attention_mask), want)


def attention_module(config):
    module = torch.nn.Module()
    module.config, module.is_causal, module.num_key_value_groups = config, True, 2
    return module


PADDING = {"padded": [4, 0], "right padded": [0, -3], "gaps": [(2, 5), 0]}  # per row: left (+n), right (-n), hole


@pytest.mark.parametrize("mode", ["batched", "packed ids", "cu_seq_lens", "kv cache", "padded", "right padded", "gaps",
                                  "static cache"])
def test_attention_function(mode):
    """`ctxext_attention_forward` on unrotated queries and keys rotated by transformers' own rotary embedding ==
    transformers' sdpa attention on both rotated, with the equivalent explicit mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from ctxext_kernels.integrations.attention_backend import SPEC_ATTRIBUTE, ctxext_attention_forward

    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256)
    module = attention_module(config)
    module.__dict__[SPEC_ATTRIBUTE] = RopeSpec.from_hf_config(config)
    g = torch.Generator().manual_seed(0)
    batch, seq = (1, 12) if mode in ("packed ids", "cu_seq_lens") else (2, 10)
    q, k, v = (torch.randn(batch, h, seq, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    pos = torch.arange(seq).expand(batch, seq)
    if mode in ("packed ids", "cu_seq_lens"):
        pos = torch.tensor([[0, 1, 2, 7, 9, 0, 1, 5, 6, 0, 1, 2]])
    elif mode == "batched":
        pos = pos + 3
    q_rot, k_rot = apply_rotary_pos_emb(q, k, *LlamaRotaryEmbedding(config)(v, pos))
    keep = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None]  # [1, 1, queries, keys]: causal
    mask, kwargs, n_new = None, {}, seq
    if mode in ("packed ids", "cu_seq_lens"):
        seg = torch.tensor([0] * 5 + [1] * 4 + [2] * 3)
        keep = keep & (seg[:, None] == seg[None, :])
        if mode == "cu_seq_lens":
            kwargs["cu_seq_lens_q"] = torch.tensor([0, 5, 9, 12], dtype=torch.int32)
    elif mode == "kv cache":  # the last 3 tokens are new queries against all 10 cached (rotated) keys
        n_new = 3
    elif mode in PADDING:  # row 0 left-padded by 4, right-padded by 3, or with a hole at tokens 2-4
        mask = torch.ones(batch, seq, dtype=torch.bool)
        for row, pad in enumerate(PADDING[mode]):
            mask[row, slice(*pad) if isinstance(pad, tuple) else slice(pad) if pad >= 0 else slice(pad, None)] = False
        keep = keep & mask[:, None, None, :]
    elif mode == "static cache":  # a preallocated buffer of 14 slots, 10 written: the mask covers those
        mask = torch.ones(batch, seq, dtype=torch.bool)
        k_rot, v = (torch.cat([x, torch.full((batch, 2, 4, 16), 1e3, dtype=x.dtype)], dim=2) for x in (k_rot, v))
    want = sdpa_attention_forward(module, q_rot[:, :, -n_new:], k_rot[:, :, :seq], v[:, :, :seq],
                                  keep[:, :, -n_new:], is_causal=False)[0]
    got, weights = ctxext_attention_forward(module, q[:, :, -n_new:].float(), k_rot.float(), v.float(), mask,
                                            position_ids=pos[:, -n_new:], **kwargs)
    assert weights is None
    if mask is not None:  # padded queries: zeros (flash convention) where sdpa has garbage
        assert torch.all(got[~mask] == 0)
        got, want = got[mask], want[mask]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_compiled_padding_mask_has_no_graph_break_and_gaps_are_named():
    """Under torch.compile(fullgraph=True) a padding mask takes no host sync (left and right padding: the per-row
    first key), giving the eager outputs; a mask with a gap inside a row cannot be served without one and fails a
    device-side assert that says so (eager serves it by unpadding)."""
    from ctxext_kernels.integrations.attention_backend import SPEC_ATTRIBUTE, ctxext_attention_forward

    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    module = attention_module(config)
    module.__dict__[SPEC_ATTRIBUTE] = RopeSpec.from_hf_config(config)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 10, 16, generator=g) for h in (4, 2, 2))
    pos = torch.arange(10).expand(2, 10)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, :4], mask[1, 7:] = False, False  # one left-padded row, one right-padded
    torch._dynamo.reset()
    compiled = torch.compile(ctxext_attention_forward, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(module, q, k, v, mask, position_ids=pos)[0],
                               ctxext_attention_forward(module, q, k, v, mask, position_ids=pos)[0])
    mask[1] = torch.tensor([True] * 3 + [False] * 2 + [True] * 5)
    eager = ctxext_attention_forward(module, q, k, v, mask, position_ids=pos)[0]  # served, unpadded
    assert torch.isfinite(eager).all()
    with pytest.raises(RuntimeError, match="padding between tokens of a row"):
        compiled(module, q, k, v, mask, position_ids=pos)


def test_padding_mask_syncs_once_per_forward_not_per_layer():
    """Eager, whether a padding mask has gaps is read on the host once per mask: a 4-layer model makes as many host
    syncs (`_local_scalar_dense`: item, bool, tolist) in a padded forward as a 2-layer one, and the logits match sdpa's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountSyncs(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountSyncs.count += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    input_ids, attention_mask = padded(side="left")
    patch(["llama"])
    counts = {}
    for layers in (2, 4):
        model = build("llama", ATTN_IMPLEMENTATION, num_hidden_layers=layers)
        with torch.no_grad():
            model(input_ids, attention_mask=attention_mask)  # builds each layer's RopeSpec once
            CountSyncs.count = 0
            with CountSyncs():
                logits = model(input_ids, attention_mask=attention_mask).logits
        counts[layers] = CountSyncs.count
        want = build("llama", "sdpa", num_hidden_layers=layers)(input_ids, attention_mask=attention_mask).logits
        keep = attention_mask.bool()
        torch.testing.assert_close(logits[keep], want[keep].detach(), rtol=1e-5, atol=1e-5)
    assert counts[4] == counts[2] <= 2, counts


@pytest.mark.parametrize("what,family,overrides,call,message", [
    ("soft-capping", "gemma2", {}, {}, "soft-capping"),
    ("sliding window shorter than the keys", "mistral", {"sliding_window": 4}, {}, "sliding_window=4"),
    ("4-D mask", "llama", {}, {"attention_mask": torch.ones(2, 1, 12, 12)}, "2-D padding masks"),
    ("output_attentions", "llama", {}, {"output_attentions": True}, "output_attentions"),
    ("dropout", "llama", {"attention_dropout": 0.1}, {"train": True}, "dropout"),
    ("unknown argument", "llama", {}, {"some_bias": torch.zeros(1)}, "some_bias"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_refused_with_a_named_error(what, family, overrides, call, message):
    """What the kernels do not compute is refused before anything runs, naming what to use instead."""
    patch([family])
    model = build(family, ATTN_IMPLEMENTATION, **overrides)
    call = dict(call)
    if call.pop("train", False):
        model.train()
    with pytest.raises(NotImplementedError, match=message) as error:
        model(torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5)), **call)
    assert "attn_implementation" in str(error.value)


def test_keys_and_queries_turn_by_one_spec():
    """The keys (RoPE op) and the queries (attention kernel) turn by the config's frequencies, even when the rotary
    module's own buffer was cast down (`model.to(bfloat16)` casts it): relative positions stay exact."""
    patch(["llama"])
    model = tiny_llama(ATTN_IMPLEMENTATION)
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = model(input_ids).logits
        rotary = model.model.rotary_emb
        rotary.inv_freq = rotary.inv_freq.bfloat16()
        torch.testing.assert_close(model(input_ids).logits, want, atol=0, rtol=0)


def test_window_as_long_as_the_keys_is_served():
    """sliding_window == the key count cuts nothing off: served, equal to sdpa (which applies it)."""
    input_ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(6))
    want = run(build("mistral", "sdpa", sliding_window=12), input_ids, None)
    patch(["mistral"])
    assert_same_run(run(build("mistral", ATTN_IMPLEMENTATION, sliding_window=12), input_ids, None), want)


@contextlib.contextmanager
def host_syncs_raise():
    """Every Python-level way a tensor's value reaches the host raises inside the block."""
    def refuse(name):
        def method(*args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name}")
        return method
    names = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero")
    with pytest.MonkeyPatch.context() as scope:
        for name in names:
            scope.setattr(torch.Tensor, name, refuse(name))
        scope.setattr(torch, "nonzero", refuse("nonzero"))
        yield


def test_training_path_never_syncs(monkeypatch):
    """Rows of equal length, no mask, PoSE-skipped ids: the key rotation, the attention and the whole backward run
    with every host sync raising (stock transformers' mask and rotary set-up outside them may sync)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama import modeling_llama

    patch(["llama"])
    guarded_attention = ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION]
    rotate_keys = modeling_llama.apply_rotary_pos_emb

    def guarded(function):
        def call(*args, **kwargs):
            with host_syncs_raise():
                return function(*args, **kwargs)
        return call

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, ATTN_IMPLEMENTATION, guarded(guarded_attention))
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", guarded(rotate_keys))
    model = tiny_llama(ATTN_IMPLEMENTATION)
    position_ids = POSITIONS["pose skip"]
    input_ids = torch.randint(0, VOCAB, position_ids.shape, generator=torch.Generator().manual_seed(7))
    loss = model(input_ids, position_ids=position_ids, labels=input_ids).loss
    with host_syncs_raise():
        loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_training_step_compiles_to_one_graph():
    """torch.compile(fullgraph=True) of a training step (forward and backward through AOT autograd): no graph break,
    so nothing in it syncs with the host; same loss and gradients as eager."""
    patch(["llama"])
    model = build("llama", ATTN_IMPLEMENTATION, num_hidden_layers=1)
    position_ids = POSITIONS["pose skip"]
    input_ids = torch.randint(0, VOCAB, position_ids.shape, generator=torch.Generator().manual_seed(8))
    want = run(model, input_ids, position_ids)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    model.zero_grad()
    out = compiled(input_ids, position_ids=position_ids, labels=input_ids)
    out.loss.backward()
    torch.testing.assert_close(out.logits.detach(), want[0], atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[1][name], atol=1e-5, rtol=1e-4, msg=name)
