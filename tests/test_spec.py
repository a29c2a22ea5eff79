"""RopeSpec against transformers' own rope init functions, for every rope type, over several configs."""

import pytest
import torch
import transformers

from ctxext_kernels import RopeSpec

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5

LONGROPE = {"short_factor": [1.0 + 0.02 * i for i in range(32)], "long_factor": [1.5 + 0.25 * i for i in range(32)],
            "original_max_position_embeddings": 1024}
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}
CONFIGS = [  # (rope_type, scaling params, head-size overrides)
    ("default", {}, {}),
    ("default", {}, {"partial_rotary_factor": 0.5}),
    ("linear", {"factor": 4.0}, {}),
    ("linear", {"factor": 2.5}, {"head_dim": 128}),
    ("dynamic", {"factor": 2.0}, {}),
    ("dynamic", {"factor": 8.0}, {"partial_rotary_factor": 0.25}),
    ("yarn", {"factor": 4.0}, {}),
    ("yarn", {"factor": 16.0, "beta_fast": 16, "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 0.707}, {}),
    ("yarn", {"factor": 4.0, "attention_factor": 1.3, "truncate": False}, {"head_dim": 128}),
    ("llama3", LLAMA3, {}),
    ("llama3", dict(LLAMA3, factor=32.0, high_freq_factor=2.0), {"head_dim": 128}),
    ("longrope", LONGROPE, {}),
    ("longrope", dict(LONGROPE, attention_factor=1.1), {}),
    ("proportional", {"partial_rotary_factor": 0.25}, {}),
]


def _config(rope_type, scaling, overrides, theta):
    # Llama's default rope ignores partial_rotary_factor; Phi's honours it, so partial cases use a Phi config.
    from transformers import LlamaConfig, PhiConfig

    config_class = PhiConfig if "partial_rotary_factor" in overrides else LlamaConfig
    head_dim = overrides.get("head_dim", 64)
    params = dict(rope_type=rope_type, rope_theta=theta, **scaling)
    if "partial_rotary_factor" in overrides:
        params["partial_rotary_factor"] = overrides["partial_rotary_factor"]
    common = dict(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=4096)
    if TRANSFORMERS_5:
        return config_class(**common, rope_parameters=params)
    partial = {"partial_rotary_factor": params.pop("partial_rotary_factor")} if "partial_rotary_factor" in params else {}
    if rope_type == "default":
        return config_class(**common, rope_theta=theta, **partial)
    config = config_class(**common, rope_theta=theta, rope_scaling=params, **partial)
    if rope_type == "longrope":  # 4.x LongRoPE reads the pretraining window off the config itself (Phi-3's spelling)
        config.original_max_position_embeddings = params["original_max_position_embeddings"]
    return config


def _transformers_init(config, rope_type, seq_len=None):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        from transformers.models.phi.modeling_phi import PhiRotaryEmbedding

        rotary = PhiRotaryEmbedding if type(config).__name__ == "PhiConfig" else LlamaRotaryEmbedding
        fn = getattr(rotary, "compute_default_rope_parameters", None) or ROPE_INIT_FUNCTIONS["default"]
        return fn(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
@pytest.mark.parametrize("rope_type,scaling,overrides", CONFIGS, ids=lambda v: v if isinstance(v, str) else "")
def test_inv_freq_equals_transformers(rope_type, scaling, overrides, theta):
    if rope_type == "proportional" and not TRANSFORMERS_5:
        pytest.skip("transformers 4.x has no proportional rope")
    config = _config(rope_type, scaling, overrides, theta)
    spec = RopeSpec.from_hf_config(config)
    inv_freq, attention_scaling = _transformers_init(config, rope_type)
    assert spec.rope_type == rope_type
    assert torch.equal(spec.inv_freq, inv_freq)
    assert spec.rotary_dim == 2 * inv_freq.numel()
    assert spec.attention_scaling == pytest.approx(attention_scaling, rel=1e-12)
    for seq_len in (1000, 4096, 4097, 20000):  # below, at and beyond the windows
        expected = _transformers_init(config, rope_type, seq_len)[0] if spec.is_dynamic else inv_freq
        assert torch.equal(spec.inv_freq_for(seq_len), expected), seq_len


def test_from_params_equals_from_config():
    config = _config("yarn", {"factor": 4.0}, {}, 10000.0)
    a = RopeSpec.from_hf_config(config)
    b = RopeSpec.from_params(64, 10000.0, "yarn", max_position_embeddings=4096, factor=4.0,
                             original_max_position_embeddings=4096)
    assert torch.equal(a.inv_freq, b.inv_freq) and a.attention_scaling == b.attention_scaling


def test_unknown_rope_type_is_named():
    with pytest.raises(ValueError, match="unknown rope type 'ntk-magic'"):
        RopeSpec.from_params(64, rope_type="ntk-magic")


def test_longrope_factor_count_is_checked():
    with pytest.raises(ValueError, match="short_factor has 3 entries, expected rotary_dim / 2 = 32"):
        RopeSpec.from_params(64, rope_type="longrope", short_factor=[1.0] * 3, long_factor=[1.0] * 3,
                             original_max_position_embeddings=512)


def test_per_layer_type_parameters_need_a_layer_type():
    from types import SimpleNamespace

    config = SimpleNamespace(head_dim=64, max_position_embeddings=1024, rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}})
    with pytest.raises(ValueError, match="pass layer_type="):
        RopeSpec.from_hf_config(config)
    spec = RopeSpec.from_hf_config(config, layer_type="sliding_attention")
    assert spec.rope_type == "linear"
