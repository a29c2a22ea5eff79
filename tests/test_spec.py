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
    ("default", {}, {"partial_rotary_factor": 0.3}),  # int(64 * 0.3) = 19 is odd: transformers rotates 20 dims
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




def test_per_layer_type_parameters_need_a_layer_type():
    from types import SimpleNamespace

    config = SimpleNamespace(head_dim=64, max_position_embeddings=1024, rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}})
    with pytest.raises(ValueError, match="pass layer_type="):
        RopeSpec.from_hf_config(config)
    spec = RopeSpec.from_hf_config(config, layer_type="sliding_attention")
    assert spec.rope_type == "linear"


# ------------------------------------------------------------------------------------------- parameter validation
BAD_PARAMS = [  # (rope_type, scaling params, head-size overrides, error type, message naming the key)
    ("default", {"rope_theta": 0.0}, {}, ValueError, "'rope_theta'.*> 1"),
    ("default", {"rope_theta": -1e4}, {}, ValueError, "'rope_theta'"),
    ("default", {"rope_theta": float("nan")}, {}, ValueError, "'rope_theta'.*nan"),
    ("default", {"rope_theta": "10000"}, {}, TypeError, "'rope_theta'.*must be a number"),
    ("default", {}, {"partial_rotary_factor": 0.0}, ValueError, "'partial_rotary_factor'"),
    ("default", {}, {"partial_rotary_factor": 1.5}, ValueError, "'partial_rotary_factor' must be in \\(0, 1\\]"),
    ("default", {}, {"partial_rotary_factor": float("nan")}, ValueError, "'partial_rotary_factor'"),
    ("default", {}, {"partial_rotary_factor": 0.01}, ValueError, "leaves 0 rotary dims"),
    ("default", {}, {"head_dim": 0}, ValueError, "head_dim must be a positive integer"),
    ("default", {}, {"head_dim": 65}, ValueError, "head_dim=65 is odd"),
    ("linear", {}, {}, ValueError, "'linear' needs the rope parameter 'factor'"),
    ("linear", {"factor": 0.0}, {}, ValueError, "'factor' \\(linear\\) must be a finite number > 0"),
    ("linear", {"factor": -2.0}, {}, ValueError, "'factor'"),
    ("linear", {"factor": float("inf")}, {}, ValueError, "'factor'"),
    ("dynamic", {"factor": 0.0}, {}, ValueError, "'factor' \\(dynamic\\)"),
    ("dynamic", {"factor": 2.0}, {"head_dim": 2}, ValueError, "more than 2 rotary dims"),
    ("yarn", {"factor": 0.0}, {}, ValueError, "'factor' \\(yarn\\)"),
    ("yarn", {"factor": float("nan")}, {}, ValueError, "'factor' \\(yarn\\)"),
    ("yarn", {"factor": 4.0, "beta_fast": -1.0}, {}, ValueError, "'beta_fast'"),
    ("yarn", {"factor": 4.0, "attention_factor": 0.0}, {}, ValueError, "'attention_factor'"),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 0}, {}, ValueError,
     "'original_max_position_embeddings'"),
    ("llama3", dict(LLAMA3, factor=0.0), {}, ValueError, "'factor' \\(llama3\\)"),
    ("llama3", dict(LLAMA3, low_freq_factor=4.0), {}, ValueError, "'high_freq_factor' \\(4.0\\) must exceed"),
    ("llama3", dict(LLAMA3, low_freq_factor=0.0), {}, ValueError, "'low_freq_factor'"),
    ("llama3", {k: v for k, v in LLAMA3.items() if k != "high_freq_factor"}, {}, ValueError,
     "needs the rope parameter 'high_freq_factor'"),
    ("longrope", dict(LONGROPE, short_factor=[1.0] * 3), {}, ValueError, "'short_factor'.*rotary_dim / 2 = 32"),
    ("longrope", dict(LONGROPE, long_factor=[1.0] * 33), {}, ValueError, "'long_factor'.*rotary_dim / 2 = 32"),
    ("longrope", dict(LONGROPE, long_factor=[0.0] * 32), {}, ValueError, "'long_factor'.*finite numbers > 0"),
    ("longrope", dict(LONGROPE, factor=-1.0), {}, ValueError, "'factor' \\(longrope\\)"),
    ("proportional", {"partial_rotary_factor": 0.25, "factor": 0.0}, {}, ValueError, "'factor' \\(proportional"),
]


def _plain_config(rope_type, scaling, overrides, spelling):
    """A config object in transformers' 5.x spelling (rope_parameters) or 4.x spelling (rope_theta + rope_scaling),
    without transformers' constructors (which warn about, or rewrite, some of these values)."""
    from types import SimpleNamespace

    params = dict(rope_type=rope_type, **scaling)
    theta = params.pop("rope_theta", 10000.0)
    partial = overrides.get("partial_rotary_factor")
    common = dict(head_dim=overrides.get("head_dim", 64), max_position_embeddings=4096)
    if spelling == "5.x":
        partial_key = {} if partial is None else {"partial_rotary_factor": partial}
        return SimpleNamespace(**common, rope_parameters=dict(params, rope_theta=theta, **partial_key))
    return SimpleNamespace(**common, rope_theta=theta, partial_rotary_factor=partial,
                           rope_scaling=None if rope_type == "default" else params)


@pytest.mark.parametrize("spelling", ["5.x", "4.x"])
@pytest.mark.parametrize("rope_type,scaling,overrides,error,message", BAD_PARAMS,
                         ids=[f"{i}-{c[0]}" for i, c in enumerate(BAD_PARAMS)])
def test_bad_rope_parameters_are_named(rope_type, scaling, overrides, error, message, spelling):
    with pytest.raises(error, match=message):
        RopeSpec.from_hf_config(_plain_config(rope_type, scaling, overrides, spelling))


@pytest.mark.parametrize("spelling", ["5.x", "4.x"])
def test_the_plain_configs_are_valid(spelling):
    """The validation refuses the bad value, not the config around it: each base config builds."""
    for rope_type, scaling in (("default", {}), ("linear", {"factor": 2.0}), ("dynamic", {"factor": 2.0}),
                               ("yarn", {"factor": 4.0}), ("llama3", LLAMA3), ("longrope", LONGROPE),
                               ("proportional", {"partial_rotary_factor": 0.0})):
        spec = RopeSpec.from_hf_config(_plain_config(rope_type, scaling, {}, spelling))
        assert bool(torch.isfinite(spec.inv_freq).all()) and spec.rotary_dim == 64


def test_factor_zero_is_refused_not_replaced():
    """YaRN used to replace factor 0 by max_position_embeddings / original_max_position_embeddings (`or`)."""
    with pytest.raises(ValueError, match="'factor'"):
        RopeSpec.from_params(64, rope_type="yarn", factor=0, original_max_position_embeddings=1024,
                             max_position_embeddings=4096)
    implicit = RopeSpec.from_params(64, rope_type="yarn", original_max_position_embeddings=1024,
                                    max_position_embeddings=4096)
    explicit = RopeSpec.from_params(64, rope_type="yarn", factor=4.0, original_max_position_embeddings=1024,
                                    max_position_embeddings=4096)
    assert torch.equal(implicit.inv_freq, explicit.inv_freq)


def test_config_none_and_missing_sizes_are_named():
    from types import SimpleNamespace

    with pytest.raises(TypeError, match="config must be"):
        RopeSpec.from_hf_config(None)
    with pytest.raises(ValueError, match="hidden_size and num_attention_heads"):
        RopeSpec.from_hf_config(SimpleNamespace(max_position_embeddings=64, rope_parameters={"rope_theta": 1e4}))
    with pytest.raises(ValueError, match="max_position_embeddings must be a positive integer"):
        RopeSpec.from_hf_config(SimpleNamespace(head_dim=64, max_position_embeddings=0))
