"""Loading a causal LM (HF folder or .gguf file) with a new RoPE scaling, shared by training and evaluation."""

from __future__ import annotations

import contextlib
import importlib.util
import math
from pathlib import Path

import torch

ROPE_TYPES = ("linear", "ntk", "dynamic", "yarn", "llama3")


def split_model_path(path: str | Path) -> tuple[str, dict]:
    """`(folder, from_pretrained kwargs)`: a .gguf file is loaded from its folder with `gguf_file=` its name."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist (pass a transformers model folder or a .gguf file)")
    if path.suffix == ".gguf":
        if importlib.util.find_spec("gguf") is None:
            raise ImportError(f"loading {path} needs the gguf package: pip install gguf (or ctxext_kernels[pose])")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_file():
        raise ValueError(f"model {path} is a file but not a .gguf file: pass a transformers model folder or a .gguf "
                         "file")
    return str(path), {}


def gguf_problem(path: Path) -> str | None:
    """Why the gguf package cannot read `path` (a truncated or corrupt file), or None when it can."""
    import gguf

    try:
        gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - every parse failure means the file is not a readable GGUF
        return f"{type(exc).__name__}: {exc}"
    return None


def rope_base_parameters(config) -> dict:
    """The model's RoPE parameters (transformers 5 `rope_parameters`, 4.x `rope_theta` + `rope_scaling`); a clear
    error for a model without rotary embeddings (learned or ALiBi positions cannot be rescaled)."""
    parameters = getattr(config, "rope_parameters", None)
    if parameters is None and getattr(config, "rope_theta", None) is not None:
        parameters = {"rope_type": "default", "rope_theta": config.rope_theta, **(config.rope_scaling or {})}
    if not parameters or "rope_theta" not in parameters:
        raise ValueError(f"model type {config.model_type!r} has no rotary position embeddings (RoPE): PoSE and RoPE "
                         "scaling need a RoPE model (LLaMA, Mistral, Qwen, SmolLM, ...)")
    return dict(parameters)


def scale_factor(config, target_length: int, factor: float | None = None,
                 trained_window: int | None = None) -> tuple[float, int]:
    """`(factor, trained_window)`: the RoPE scale factor (default `target_length / trained_window`, checked >= 1) and
    the trained window (default the config's original window or `max_position_embeddings`)."""
    if trained_window is None:
        trained_window = rope_base_parameters(config).get("original_max_position_embeddings") or \
            config.max_position_embeddings
    if trained_window < 1:
        raise ValueError(f"trained window must be >= 1 token, got {trained_window}")
    factor = factor if factor is not None else target_length / trained_window
    if not math.isfinite(factor) or factor < 1:
        raise ValueError(f"rope factor {factor:g} < 1: the target length {target_length} is inside the trained window "
                         f"{trained_window}; pass a larger target, or --trained-window / --rope-factor explicitly")
    return float(factor), int(trained_window)


def rotary_dim(config, parameters: dict) -> int:
    """d, the rotated channels per head (`head_dim x partial_rotary_factor`, as transformers computes it)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * parameters.get("partial_rotary_factor", 1.0))


def extended_rope_parameters(config, rope_type: str, target_length: int, factor: float | None = None,
                             trained_window: int | None = None) -> dict:
    """RoPE parameters scaling the model's trained window to `target_length`.

    Parameters
    ----------
    rope_type : {"linear", "ntk", "dynamic", "yarn", "llama3"}
        "ntk" is static NTK-aware scaling, the paper's NTK (PoSE section 2.2): one new base
        `rope_theta' = rope_theta x factor^(d/(d-2))` (d = rotary dim) for every position, which stretches the lowest
        frequency by exactly `factor`. It is written as rope_type "default" with that rope_theta, so stock
        transformers loads it. ("dynamic" is transformers' dynamic NTK: it only rescales positions beyond
        `max_position_embeddings`.)
    factor : float, optional
        Scale factor; default `target_length / trained_window`.
    trained_window : int, optional
        The context the model was trained on; default its `max_position_embeddings`.
    """
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")
    base = rope_base_parameters(config)
    factor, trained_window = scale_factor(config, target_length, factor, trained_window)
    partial = {"partial_rotary_factor": base["partial_rotary_factor"]} if "partial_rotary_factor" in base else {}
    if rope_type == "ntk":
        d = rotary_dim(config, base)
        if d <= 2:
            raise ValueError(f"rope_type 'ntk' needs a rotary dim > 2 (the exponent is d/(d-2)), this model has {d}")
        return {"rope_type": "default", "rope_theta": base["rope_theta"] * factor ** (d / (d - 2)), **partial}
    parameters = {"rope_type": rope_type, "rope_theta": base["rope_theta"], "factor": factor, **partial}
    if rope_type != "linear":
        # these types keep the original window in the config: dynamic NTK grows from it, YaRN and llama3 pick which
        # frequencies to interpolate by comparing wavelengths against it
        parameters["original_max_position_embeddings"] = trained_window
    if rope_type == "llama3":
        parameters.update(low_freq_factor=1.0, high_freq_factor=4.0)
    return parameters


def describe_rope_scaling(path: str | Path, rope_type: str, target_length: int, factor: float | None = None,
                          trained_window: int | None = None) -> dict:
    """What `load_model(path, rope_type=...)` does to the RoPE, for a training record: the requested type and
    factor, the trained window, the model's own rope_theta and the parameters written into the config (for "ntk" a
    "default" RoPE with a larger rope_theta, so the config alone no longer says it was NTK-scaled)."""
    from transformers import AutoConfig

    folder, kwargs = split_model_path(path)
    config = AutoConfig.from_pretrained(folder, **kwargs)
    scale, window = scale_factor(config, target_length, factor, trained_window)
    return {"rope_type": rope_type, "factor": scale, "trained_window": window,
            "original_rope_theta": rope_base_parameters(config)["rope_theta"],
            "config_rope_parameters": extended_rope_parameters(config, rope_type, target_length, factor,
                                                               trained_window)}


def set_rope_parameters(config, parameters: dict, max_position_embeddings: int) -> None:
    """Write RoPE parameters and the new window into a config (transformers 5 and 4.x spellings)."""
    if hasattr(config, "rope_parameters"):
        config.rope_parameters = parameters
    else:
        config.rope_theta = parameters["rope_theta"]
        config.rope_scaling = {k: v for k, v in parameters.items() if k != "rope_theta"}
    config.max_position_embeddings = int(max_position_embeddings)


def load_model(path: str | Path, *, rope_type: str | None = None, target_length: int | None = None,
               rope_factor: float | None = None, trained_window: int | None = None,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """`(model, tokenizer)` from a model folder or .gguf file; with `rope_type`, its RoPE rescaled for
    `target_length` (the config then says `max_position_embeddings = target_length`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, kwargs = split_model_path(path)
    with gguf_errors_named(Path(path), "gguf_file" in kwargs):
        config = AutoConfig.from_pretrained(folder, **kwargs)
        rope_base_parameters(config)
        if rope_type is not None:
            if target_length is None:
                raise ValueError("rope_type needs target_length")
            set_rope_parameters(config, extended_rope_parameters(config, rope_type, target_length, rope_factor,
                                                                 trained_window), target_length)
        if "gguf_file" in kwargs:
            from transformers import GgufConfig

            # training needs plain dense weights (GGUF blocks are not trainable); unpacking them also makes the model
            # savable as an ordinary transformers folder
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype, **kwargs).to(device)
        if "gguf_file" in kwargs:
            detach_gguf_quantizer(model)
        tokenizer = AutoTokenizer.from_pretrained(folder, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
    return model, tokenizer


def leading_bos(tokenizer) -> int | None:
    """The BOS token id the tokenizer puts before every text it encodes (through `add_bos_token` or its
    post-processor), or None when it has none or adds none: asked by encoding a text, so either mechanism counts."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


@contextlib.contextmanager
def gguf_errors_named(path: Path, is_gguf: bool):
    """transformers reports a truncated GGUF file as a numpy reshape error: when loading fails and the gguf package
    cannot read the file either, say that the file is truncated or corrupt."""
    try:
        yield
    except Exception as exc:
        problem = gguf_problem(path) if is_gguf else None
        if problem is None:
            raise
        raise ValueError(f"model {path} is not a readable GGUF file, truncated or corrupt ({path.stat().st_size} "
                         f"bytes; {problem})") from exc


def detach_gguf_quantizer(model) -> None:
    """Forget that a dequantized model came from a GGUF file: its weights are dense tensors, and transformers refuses
    to save a model that still carries the GGUF quantizer."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def select_rope(model, kernels: bool) -> str:
    """Run the model's RoPE through the ctxext kernels (`patch_model`) or stock transformers (`unpatch`: importing
    ctxext_kernels patches by default); say which."""
    from ..integrations import patch_model, unpatch

    if not kernels:
        unpatch()
        return "stock transformers RoPE (--no-kernels)"
    patch_model(model)
    return "ctxext_kernels RoPE kernels"
