"""Tiny random transformers models of every family ctxext_kernels patches (CPU, fp32), shared by the integration
tests."""

import torch
import transformers

VOCAB = 97


def tiny_config(family: str, **rope):
    """2 layers, hidden 64, 4 q heads / 2 kv heads of 16 dims; `rope` overrides the rope parameters."""
    config = transformers.AutoConfig.for_model(
        family, vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, attn_implementation="eager",
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "phi3" and not rope:  # partial rotary + LongRoPE: the interesting Phi-3 path
        rope = dict(rope_type="longrope", partial_rotary_factor=0.5, short_factor=[1.0, 1.5, 2.0, 2.5],
                    long_factor=[3.0, 4.0, 5.0, 6.0], original_max_position_embeddings=16)
        config.original_max_position_embeddings = 16  # Phi-3 also keeps it on the config (which then wins)
    if rope:
        params = dict(getattr(config, "rope_parameters", None) or {"rope_theta": 10000.0})
        params.update(rope)
        params.setdefault("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
        if hasattr(config, "rope_parameters"):
            config.rope_parameters = params
        else:  # transformers 4.57: the partial rotary factor lives on the config itself
            config.partial_rotary_factor = params.pop("partial_rotary_factor")
            config.rope_scaling = {key: value for key, value in params.items() if key != "rope_theta"}
    return config


def build(family: str, **rope):
    """The causal LM of `tiny_config(family, **rope)`, seeded, in eval mode."""
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(family, **rope)).eval()
