"""`attn_implementation="ctxext"` (RoPE inside the fused attention kernel) vs stock transformers with sdpa, on a tiny
random Llama (CPU, fp32; the Triton kernels run in the interpreter)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ctxext_kernels.integrations import patch, rotary, unpatch  # noqa: E402
from ctxext_kernels.integrations.attention_backend import ATTN_IMPLEMENTATION  # noqa: E402

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
    with monkeypatch.context() as scope:  # the rotation happens in the attention kernel: no separate RoPE step
        scope.setattr(rotary, "apply_rope", lambda *args, **kwargs: pytest.fail("separate RoPE launch"))
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


def test_generate_with_kv_cache_matches_stock():
    """Greedy decoding: the cache holds unrotated keys, rotated at their positions for each new query."""
    prompt = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = tiny_llama("sdpa").generate(prompt, **kwargs)
    patch(["llama"])
    got = tiny_llama(ATTN_IMPLEMENTATION).generate(prompt, **kwargs)
    assert torch.equal(got, want)


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
