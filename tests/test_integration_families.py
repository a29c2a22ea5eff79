"""Patched vs stock transformers on tiny random models of every supported family (CPU, fp32)."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sys  # noqa: E402

import ctxext_kernels.integrations  # noqa: E402,F401
from ctxext_kernels.integrations import FAMILIES, fused_rope_of, is_patched, patch, patch_model, unpatch  # noqa: E402
from tiny_models import VOCAB, build, tiny_config  # noqa: E402

SEQ = 24


def logits_and_grads(model, input_ids, **kwargs):
    model.zero_grad()
    out = model(input_ids, labels=input_ids, **kwargs)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.fixture(autouse=True)
def stock_afterwards():
    unpatch()
    yield
    unpatch()


def assert_close_runs(stock, patched, tol=2e-5):
    torch.testing.assert_close(patched[0], stock[0], atol=tol, rtol=tol)
    torch.testing.assert_close(patched[1], stock[1], atol=tol, rtol=tol)
    assert stock[2].keys() == patched[2].keys()
    for name in stock[2]:
        torch.testing.assert_close(patched[2][name], stock[2][name], atol=tol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_logits_and_grads_match_stock(family, monkeypatch):
    model = build(family)
    input_ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    stock = logits_and_grads(model, input_ids)
    patch([family])
    cos, sin = model.model.rotary_emb(model.model.embed_tokens(input_ids), torch.arange(SEQ)[None])
    assert type(cos) is torch.Tensor and fused_rope_of(cos, sin) is not None
    # The fused kernel must do the rotation: the stock formula (rotate_half) never runs.
    with monkeypatch.context() as scope:
        scope.setattr(sys.modules[FAMILIES[family].module_name], "rotate_half",
                      lambda x: pytest.fail("stock rotation ran"))
        patched = logits_and_grads(model, input_ids)
    assert_close_runs(stock, patched)
    unpatch()
    again = logits_and_grads(model, input_ids)
    assert torch.equal(again[0], stock[0]) and torch.equal(again[1], stock[1])


@pytest.mark.parametrize("rope", [dict(rope_type="linear", factor=2.0), dict(rope_type="dynamic", factor=2.0),
                                  dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32),
                                  dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=16)], ids=lambda r: r["rope_type"])
def test_scaled_rope_matches_stock(rope):
    model = build("llama", **rope)
    # Positions past the original window, so every scaling regime (dynamic growth included) is exercised.
    position_ids = torch.arange(SEQ)[None] * 5
    input_ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(2))
    stock = logits_and_grads(model, input_ids, position_ids=position_ids)
    patch(["llama"])
    assert_close_runs(stock, logits_and_grads(model, input_ids, position_ids=position_ids), tol=1e-4)


def test_unpatch_restores_the_original_objects_and_patch_is_idempotent():
    from transformers.models.llama import modeling_llama as ml
    from transformers.models.qwen2 import modeling_qwen2 as mq
    originals = (ml.apply_rotary_pos_emb, ml.LlamaRotaryEmbedding.forward, mq.apply_rotary_pos_emb)
    assert not is_patched()
    patch()
    first = (ml.apply_rotary_pos_emb, ml.LlamaRotaryEmbedding.forward)
    patch()
    patch(["llama"])
    assert (ml.apply_rotary_pos_emb, ml.LlamaRotaryEmbedding.forward) == first
    assert is_patched("llama") and is_patched("olmo2")
    unpatch()
    assert ml.apply_rotary_pos_emb is originals[0]
    assert ml.LlamaRotaryEmbedding.forward is originals[1]
    assert mq.apply_rotary_pos_emb is originals[2]
    assert not is_patched()


def test_patch_is_thread_safe():
    import threading
    from transformers.models.llama import modeling_llama as ml
    original = ml.apply_rotary_pos_emb
    threads = [threading.Thread(target=patch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ml.apply_rotary_pos_emb.__wrapped__ is original
    unpatch()
    assert ml.apply_rotary_pos_emb is original


def test_patch_model_on_a_prebuilt_model_and_packed_and_pose_ids():
    model = build("mistral")
    # Packed: two sequences in one row (ids restart); PoSE: one row with jumps.
    packed = torch.cat([torch.arange(10), torch.arange(SEQ - 10)])[None]
    pose = torch.cat([torch.arange(8), 40 + torch.arange(8), 100 + torch.arange(SEQ - 16)])[None]
    input_ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(3))
    stock = [logits_and_grads(model, input_ids, position_ids=ids) for ids in (packed, pose)]
    assert patch_model(model) is model and is_patched("mistral") and not is_patched("llama")
    for ids, expected in zip((packed, pose), stock):
        assert_close_runs(expected, logits_and_grads(model, input_ids, position_ids=ids))


def test_patch_model_reaches_peft_wrapped_models():
    peft = pytest.importorskip("peft", reason="peft not installed (pip install peft)")
    model = build("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    input_ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(4))
    stock = logits_and_grads(lora, input_ids)
    patch_model(lora)
    assert is_patched("llama")
    assert_close_runs(stock, logits_and_grads(lora, input_ids))


def test_gradient_checkpointing():
    model = build("qwen3")
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    input_ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
    stock = logits_and_grads(model, input_ids)
    patch(["qwen3"])
    assert_close_runs(stock, logits_and_grads(model, input_ids))


def test_generate_with_kv_cache_matches_stock():
    model = build("llama")
    prompt = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(6))
    stock = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    patch()
    assert torch.equal(model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0), stock)


def test_bf16_autocast_within_bf16_rounding():
    model = build("gemma2")
    input_ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock = model(input_ids).logits.float()
        patch(["gemma2"])
        patched = model(input_ids).logits.float()
    torch.testing.assert_close(patched, stock, atol=5e-2, rtol=5e-2)


def test_unknown_family_warns_once_and_is_left_alone():
    sys.modules["ctxext_kernels.integrations.patch"]._warned.discard("not-a-family")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch(["not-a-family"])
        patch(["not-a-family"])
    messages = [str(w.message) for w in caught if "not-a-family" in str(w.message)]
    assert len(messages) == 1 and "not supported" in messages[0]
    assert not is_patched()


def test_dropin_rotary_embedding_matches_stock_class_and_dynamic_updates():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as Stock
    from ctxext_kernels.integrations import LlamaRotaryEmbedding
    config = tiny_config("llama", rope_type="dynamic", factor=2.0)
    ours, stock = LlamaRotaryEmbedding(config), Stock(config)
    assert set(dict(ours.named_buffers())) == {"inv_freq", "original_inv_freq"} and not ours.state_dict()
    x = torch.zeros(1, 1, 64)
    for length in (64, 300, 200, 40):  # within, grow, keep grown, reset below the window
        ids = torch.arange(length)[None]
        cos, sin = stock(x, ids)
        ours_cos, ours_sin = ours(x, ids)
        torch.testing.assert_close(ours.inv_freq, stock.inv_freq)
        assert ours.max_seq_len_cached == stock.max_seq_len_cached
        torch.testing.assert_close(ours_cos, cos, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours_sin, sin, atol=1e-4, rtol=0)


def test_unsupported_transformers_version_leaves_everything_stock(monkeypatch):
    from transformers.models.llama import modeling_llama as ml
    patch_module = sys.modules["ctxext_kernels.integrations.patch"]
    # The module patch.py imports (an earlier test may have re-imported transformers under the same name).
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.40.0")
    patch_module._warned.discard("version")
    original = ml.apply_rotary_pos_emb
    with pytest.warns(RuntimeWarning, match="outside the supported range"):
        assert patch() == []
    assert ml.apply_rotary_pos_emb is original and not is_patched()


def test_patch_model_warns_for_an_unsupported_family():
    class FancyRotaryEmbedding(torch.nn.Module):
        pass
    FancyRotaryEmbedding.__module__ = "transformers.models.fancy.modeling_fancy"
    sys.modules["ctxext_kernels.integrations.patch"]._warned.discard("fancy")
    with pytest.warns(RuntimeWarning, match="'fancy' is not supported"):
        patch_model(torch.nn.Sequential(FancyRotaryEmbedding()))
    assert not is_patched()


def test_tables_serve_code_that_rotates_by_itself():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as Stock
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as stock_apply
    from ctxext_kernels.integrations import LlamaRotaryEmbedding
    config = tiny_config("llama")
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 7, 30, 31]])  # packed restart + PoSE jump
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    cos, sin = LlamaRotaryEmbedding(config)(q, position_ids)
    fused = fused_rope_of(cos, sin).rotate(q, k)
    through_tables = stock_apply(q, k, cos, sin)  # the stock formula on the tables
    expected = stock_apply(q, k, *Stock(config)(q, position_ids))
    for got, other, want in zip(fused, through_tables, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other, want, atol=1e-5, rtol=1e-5)
    assert cos.shape == (1, 8, 16) and cos.dtype == torch.float32
