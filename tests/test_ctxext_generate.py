"""Generation with `attn_implementation="ctxext"` (queries rotated in the kernel, a KV cache of rotated keys) against
stock sdpa and against itself, on tiny random models of several families (CPU, fp32): padded batches, static caches,
beam search, inputs_embeds, continued generation, logits_to_keep, and a decode step's RoPE work."""

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import VOCAB, tiny_config  # noqa: E402

from ctxext_kernels.integrations import patch, unpatch  # noqa: E402
from ctxext_kernels.integrations import attention_backend, rotary  # noqa: E402
from ctxext_kernels.integrations.attention_backend import ATTN_IMPLEMENTATION  # noqa: E402

NEW_TOKENS = 5
# The name of a cache to continue from (transformers 5.x renames past_key_values)
CACHE = "cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters else "past_key_values"
# phi3: partial rotary without LongRoPE, whose short/long switch depends on the batch's longest row (as stock does),
# so a padded batch and its rows alone would legitimately differ. gemma: head_dim 256, the widest the kernels take.
FAMILY_CONFIG = {"llama": {}, "mistral": {}, "qwen2": {}, "gemma": {"head_dim": 256},
                 "phi3": {"rope": dict(rope_type="default", partial_rotary_factor=0.5)}}


@pytest.fixture(autouse=True)
def patched():
    unpatch()
    patch()
    yield
    unpatch()


def build(family: str, attn_implementation: str, rope: dict | None = None, **overrides):
    """A tiny `family` model (FAMILY_CONFIG settings, then `overrides`); `rope`: rope parameters (any version)."""
    settings = dict(FAMILY_CONFIG.get(family, {}))
    config = tiny_config(family, **(rope or settings.pop("rope", {})))
    settings.pop("rope", None)
    for name, value in {**settings, **overrides}.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.config._attn_implementation = attn_implementation
    return model


def padded_prompts():
    """Two prompts of 5 and 9 tokens, the short one left-padded: (input_ids [2, 9], attention_mask [2, 9])."""
    g = torch.Generator().manual_seed(11)
    input_ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[0, :4] = 0
    input_ids[0, :4] = 0
    return input_ids, attention_mask


def generate(model, input_ids, **kwargs):
    """Greedy (unless num_beams) decoding of NEW_TOKENS tokens (no early end): (sequences, per-step logits
    [steps, B, vocab])."""
    out = model.generate(input_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True, output_logits=True, **kwargs)
    return out.sequences, torch.stack(out.logits)


def assert_same_generation(got, want, atol=2e-5):
    assert torch.equal(got[0], want[0]), f"tokens differ:\n{got[0]}\n{want[0]}"
    torch.testing.assert_close(got[1], want[1], atol=atol, rtol=atol)


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIG))
def test_padded_batch_and_static_cache(family):
    """A left-padded batch decodes each row as that row alone would, as stock sdpa decodes the batch, and the same
    with a static (preallocated) cache."""
    input_ids, attention_mask = padded_prompts()
    model = build(family, ATTN_IMPLEMENTATION)
    batch = generate(model, input_ids, attention_mask=attention_mask)
    assert_same_generation(batch, generate(build(family, "sdpa"), input_ids, attention_mask=attention_mask))
    assert_same_generation(generate(model, input_ids, attention_mask=attention_mask, cache_implementation="static"),
                           batch)
    for row, start in enumerate((4, 0)):
        alone = generate(model, input_ids[row:row + 1, start:])
        assert torch.equal(alone[0][0], batch[0][row, start:])
        torch.testing.assert_close(alone[1][:, 0], batch[1][:, row], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_beam_search_matches_sdpa(family):
    input_ids, attention_mask = padded_prompts()
    kwargs = dict(attention_mask=attention_mask, num_beams=3, num_return_sequences=2)
    got = generate(build(family, ATTN_IMPLEMENTATION), input_ids, **kwargs)
    want = generate(build(family, "sdpa"), input_ids, **kwargs)
    assert_same_generation(got, want)


def test_static_cache_without_attention_mask():
    """A static cache preallocates more key slots than it has written; with no mask at all (transformers drops an
    all-ones mask), the unwritten slots must still stay out of attention."""
    input_ids = padded_prompts()[0][1:]
    model = build("llama", ATTN_IMPLEMENTATION)
    want = generate(build("llama", "sdpa"), input_ids, cache_implementation="static")
    assert_same_generation(generate(model, input_ids, cache_implementation="static"), want)
    cache = transformers.StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():  # a bare forward through a fresh static cache: 9 of 16 slots written
        logits = model(input_ids, None, None, cache).logits  # (input_ids, attention_mask, position_ids, cache)
    torch.testing.assert_close(logits[0, -1], want[1][0, 0], atol=2e-5, rtol=2e-5)


def test_static_cache_generation_under_torch_compile_fullgraph():
    """With a static cache, transformers' generate compiles the model's forward (on GPUs by default; forced here on
    the CPU). With `fullgraph=True` any graph break raises: a left-padded batch decodes inside one graph (no host
    sync: the padding reaches the kernels as per-row key starts), and the compiled steps give what eager ones give."""
    input_ids, attention_mask = padded_prompts()
    model = build("llama", ATTN_IMPLEMENTATION)
    want = generate(model, input_ids, attention_mask=attention_mask, cache_implementation="static")
    compile_config = transformers.CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True  # transformers' switch to compile on the CPU too
    torch._dynamo.reset()
    compiled_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    got = generate(model, input_ids, attention_mask=attention_mask, cache_implementation="static",
                   compile_config=compile_config)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > compiled_before, "generate did not compile"
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert_same_generation(got, want)


def test_sliding_window_cache_decodes_past_the_window():
    """Mistral with sliding_window=9 and a 9-token prompt: its cache keeps the last 8 keys, so no step sees more than
    9 keys and the window cuts nothing off (served); 14 tokens in all, past the window, as stock sdpa."""
    input_ids, attention_mask = padded_prompts()
    model, stock = (build("mistral", name, sliding_window=9) for name in (ATTN_IMPLEMENTATION, "sdpa"))
    assert_same_generation(generate(model, input_ids, attention_mask=attention_mask),
                           generate(stock, input_ids, attention_mask=attention_mask))


def test_dynamic_ntk_grows_as_stock_within_a_generation():
    """Dynamic NTK past the original window (8 positions): each step's frequencies follow the longest position, the
    cached keys keep the frequencies they were rotated with, as in stock transformers."""
    input_ids = padded_prompts()[0][1:]
    got, want = (build("llama", name, rope=dict(rope_type="dynamic", factor=2.0), max_position_embeddings=8)
                 for name in (ATTN_IMPLEMENTATION, "sdpa"))
    assert_same_generation(generate(got, input_ids), generate(want, input_ids), atol=1e-4)


def test_inputs_embeds_and_continued_generation():
    """Generation from inputs_embeds, and generation continued from a returned cache (filled by stock sdpa: both hold
    rotated keys), equal one plain run."""
    input_ids, attention_mask = padded_prompts()
    model = build("llama", ATTN_IMPLEMENTATION)
    want = generate(model, input_ids, attention_mask=attention_mask)
    embeds = model.get_input_embeddings()(input_ids)
    from_embeds = generate(model, None, inputs_embeds=embeds, attention_mask=attention_mask)
    assert torch.equal(from_embeds[0], want[0][:, input_ids.shape[1]:])
    torch.testing.assert_close(from_embeds[1], want[1], atol=2e-5, rtol=2e-5)

    stock = build("llama", "sdpa")
    first = stock.generate(input_ids, attention_mask=attention_mask, max_new_tokens=2, do_sample=False,
                           pad_token_id=0, return_dict_in_generate=True)
    mask = torch.cat([attention_mask, torch.ones(2, 2, dtype=attention_mask.dtype)], dim=1)
    rest = model.generate(first.sequences, attention_mask=mask, max_new_tokens=NEW_TOKENS - 2, do_sample=False,
                          pad_token_id=0, **{CACHE: first.past_key_values})
    assert torch.equal(rest, want[0])


def test_logits_to_keep():
    input_ids, attention_mask = padded_prompts()
    model = build("llama", ATTN_IMPLEMENTATION)
    with torch.no_grad():
        full = model(input_ids, attention_mask=attention_mask).logits
        last = model(input_ids, attention_mask=attention_mask, logits_to_keep=1).logits
        stock = build("llama", "sdpa")(input_ids, attention_mask=attention_mask, logits_to_keep=1).logits
    assert last.shape == (2, 1, VOCAB)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(last, stock, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_decode_step_rotates_only_its_own_tokens(cache, monkeypatch):
    """The cache holds rotated keys: a decode step hands the RoPE op its one new key per layer and the attention its
    one query (no re-rotation of the cache, whatever its length)."""
    rope_keys, queries = [], []
    apply_rope, rope_attention = rotary.apply_rope, attention_backend.rope_attention

    def counting_rope(q, k, *args, **kwargs):
        assert q is None, "the deferred path rotates keys alone"
        rope_keys.append(k.shape[2])
        return apply_rope(q, k, *args, **kwargs)

    def counting_attention(q, *args, **kwargs):
        queries.append(q.shape[2])
        return rope_attention(q, *args, **kwargs)

    monkeypatch.setattr(rotary, "apply_rope", counting_rope)
    monkeypatch.setattr(attention_backend, "rope_attention", counting_attention)
    model = build("llama", ATTN_IMPLEMENTATION)
    generate(model, padded_prompts()[0][1:], cache_implementation=cache)
    layers = model.config.num_hidden_layers
    assert rope_keys == [9] * layers + [1] * layers * (NEW_TOKENS - 1)
    assert queries == rope_keys


def test_gradient_checkpointing_with_input_grads():
    """Training a padded batch with gradient checkpointing and input-requiring-grad embeddings (the PEFT setup):
    parameter and input gradients as stock sdpa without checkpointing."""
    input_ids, attention_mask = padded_prompts()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    grads = []
    for name, checkpointing in ((ATTN_IMPLEMENTATION, True), ("sdpa", False)):
        model = build("llama", name).train()
        if checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
                model.activation_checkpointing_enable({"use_reentrant": True})
            else:
                model.gradient_checkpointing_enable({"use_reentrant": True})
            model.enable_input_require_grads()
        embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_()
        model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels).loss.backward()
        grads.append({"inputs_embeds": embeds.grad * attention_mask[..., None],
                      **{n: p.grad for n, p in model.named_parameters()}})
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=2e-5, rtol=1e-4, msg=name)
