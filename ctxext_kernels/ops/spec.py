"""`RopeSpec`: the rotary frequencies of a model, read from its transformers config.

The formulas are written here independently of transformers (tests compare them with transformers'
`ROPE_INIT_FUNCTIONS` for every rope type) and computed with the same fp32 torch operations, so `inv_freq` is
bit-identical to what a stock model uses. Kernels never see the rope type: they take `inv_freq` (fp32,
`[rotary_dim // 2]`) and `attention_scaling`, so every scaling method, present and future, runs through one kernel.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import torch

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")
ANGLE_MODES = ("exact", "fp32")
# Positions are converted to fp32 inside the kernels; above 2^24 consecutive integers collapse.
MAX_POSITION = 2**24 - 1


def _exponents(dim: int, denominator: int, device) -> torch.Tensor:
    """`[0, 2, 4, ...] / denominator` in fp32, the exponent every rope type raises `base` to."""
    return torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float32) / denominator


def _default_inv_freq(base: float, dim: int, device) -> torch.Tensor:
    return 1.0 / (base ** _exponents(dim, dim, device))


def _yarn_attention_factor(factor: float, mscale: float | None, mscale_all_dim: float | None) -> float:
    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if mscale and mscale_all_dim:
        return float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
    return get_mscale(factor)


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """Everything a RoPE kernel needs about a model's rotary embedding.

    Attributes:
        rope_type: one of `ROPE_TYPES`.
        head_dim: size of one attention head.
        rotary_dim: leading dims of each head that are rotated (`head_dim * partial_rotary_factor`); the rest pass
            through unchanged.
        inv_freq: fp32 `[rotary_dim // 2]`, the frequencies at the model's original window (for dynamic NTK and
            LongRoPE see `inv_freq_for`).
        attention_scaling: multiplies cos and sin (YaRN / LongRoPE attention temperature; 1.0 otherwise).
        params: the rope parameters the spec was built from (rope_theta, factor, ...).
        max_position_embeddings: the config's `max_position_embeddings`.
        angle: "exact" (two-product + reduction mod 2pi, the default) or "fp32" (angle = fp32(position * inv_freq),
            the rounding stock transformers uses, for bit-level parity).
    """

    rope_type: str
    head_dim: int
    rotary_dim: int
    inv_freq: torch.Tensor
    attention_scaling: float
    params: Mapping[str, Any]
    max_position_embeddings: int
    angle: str = "exact"

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_hf_config(cls, config, device=None, *, layer_type: str | None = None, angle: str = "exact") -> "RopeSpec":
        """Build the spec of a transformers config (5.x `rope_parameters` or 4.x `rope_theta` + `rope_scaling`).

        `layer_type` picks one entry of per-layer-type rope parameters (e.g. "sliding_attention" in Gemma 3).
        """
        params = cls._rope_params(config, layer_type)
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"unknown rope type {rope_type!r}; ctxext_kernels supports {', '.join(ROPE_TYPES)}")
        if angle not in ANGLE_MODES:
            raise ValueError(f"angle must be one of {ANGLE_MODES}, got {angle!r}")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        max_pos = int(config.max_position_embeddings)
        inv_freq, scaling, rotary_dim = _INIT[rope_type](params, head_dim, max_pos, None, device)
        return cls(rope_type, int(head_dim), rotary_dim, inv_freq, float(scaling), params, max_pos, angle)

    @classmethod
    def from_params(cls, head_dim: int, rope_theta: float = 10000.0, rope_type: str = "default", *,
                    max_position_embeddings: int = 2048, partial_rotary_factor: float = 1.0, device=None,
                    angle: str = "exact", **scaling) -> "RopeSpec":
        """Build a spec without a transformers config, e.g. `RopeSpec.from_params(128, 5e5, "linear", factor=4.0)`."""
        config = _PlainConfig(head_dim=head_dim, max_position_embeddings=max_position_embeddings,
                              rope_parameters=dict(rope_type=rope_type, rope_theta=rope_theta,
                                                   partial_rotary_factor=partial_rotary_factor, **scaling))
        return cls.from_hf_config(config, device, angle=angle)

    @staticmethod
    def _rope_params(config, layer_type: str | None) -> dict[str, Any]:
        params = getattr(config, "rope_parameters", None)
        if not params:  # transformers 4.x: rope_theta on the config, scaling in rope_scaling (or nothing)
            params = dict(getattr(config, "rope_scaling", None) or {})
        if any(isinstance(v, Mapping) for v in params.values()):  # per-layer-type parameters
            if layer_type is None:
                raise ValueError(f"this config has per-layer-type rope parameters ({', '.join(params)}); "
                                 "pass layer_type=")
            params = params[layer_type]
        params = dict(params)
        params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
        partial = getattr(config, "partial_rotary_factor", None)
        if partial is not None:
            params.setdefault("partial_rotary_factor", partial)
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type in ("llama3", "yarn", "longrope"):
            # Phi-3 keeps the pretraining length on the config itself, and it takes priority there.
            original = getattr(config, "original_max_position_embeddings", None)
            if original is not None:
                params["original_max_position_embeddings"] = original
            params.setdefault("original_max_position_embeddings", config.max_position_embeddings)
        return params

    def replace(self, **changes) -> "RopeSpec":
        return dataclasses.replace(self, **changes)

    def to(self, device) -> "RopeSpec":
        return self.replace(inv_freq=self.inv_freq.to(device))

    # ------------------------------------------------------------------------------------------------- dynamic use
    @property
    def is_dynamic(self) -> bool:
        """True when the frequencies depend on the longest position of the batch (dynamic NTK, LongRoPE)."""
        return self.rope_type in ("dynamic", "longrope")

    def inv_freq_for(self, seq_len: int) -> torch.Tensor:
        """Frequencies for a batch whose largest position + 1 is `seq_len`; `inv_freq` for static rope types."""
        if not self.is_dynamic:
            return self.inv_freq
        inv_freq, _, _ = _INIT[self.rope_type](self.params, self.head_dim, self.max_position_embeddings, int(seq_len),
                                              self.inv_freq.device)
        return inv_freq


@dataclasses.dataclass
class _PlainConfig:
    head_dim: int
    max_position_embeddings: int
    rope_parameters: dict


def _rotary_dim(params, head_dim: int) -> int:
    return int(head_dim * params.get("partial_rotary_factor", 1.0))


def _init_default(params, head_dim, max_pos, seq_len, device):
    dim = _rotary_dim(params, head_dim)
    return _default_inv_freq(params["rope_theta"], dim, device), 1.0, dim


def _init_linear(params, head_dim, max_pos, seq_len, device):
    inv_freq, _, dim = _init_default(params, head_dim, max_pos, seq_len, device)
    return inv_freq / params["factor"], 1.0, dim


def _init_dynamic(params, head_dim, max_pos, seq_len, device):
    # NTK-aware base growth once the batch is longer than the trained window; identical to default below it.
    dim = _rotary_dim(params, head_dim)
    factor = params["factor"]
    seq_len = max_pos if seq_len is None else max(seq_len, max_pos)
    base = params["rope_theta"] * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _default_inv_freq(base, dim, device), 1.0, dim


def _init_yarn(params, head_dim, max_pos, seq_len, device):
    # NTK-by-parts: interpolate low frequencies by `factor`, keep high ones, blend linearly between the dims whose
    # wavelength makes beta_fast and beta_slow rotations over the original window; temperature from mscale.
    dim = _rotary_dim(params, head_dim)
    base = params["rope_theta"]
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_pos / original
    scaling = params.get("attention_factor")
    if scaling is None:
        scaling = _yarn_attention_factor(factor, params.get("mscale"), params.get("mscale_all_dim"))
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(device)
    keep = 1 - ramp  # 1 where the dimension keeps its original (extrapolated) frequency
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float32) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, scaling, dim


def _init_longrope(params, head_dim, max_pos, seq_len, device):
    # Per-dimension rescale factors searched offline; the long set applies once the batch exceeds the original window.
    dim = _rotary_dim(params, head_dim)
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_pos / original
    scaling = params.get("attention_factor")
    if scaling is None:
        scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    key = "long_factor" if seq_len is not None and seq_len > original else "short_factor"
    if len(params[key]) != dim // 2:
        raise ValueError(f"longrope {key} has {len(params[key])} entries, expected rotary_dim / 2 = {dim // 2}")
    ext = torch.tensor(params[key], dtype=torch.float32, device=device)
    return 1.0 / (ext * params["rope_theta"] ** _exponents(dim, dim, device)), scaling, dim


def _init_llama3(params, head_dim, max_pos, seq_len, device):
    # Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth blend between two wavelengths.
    inv_freq, _, dim = _init_default(params, head_dim, max_pos, seq_len, device)
    factor = params["factor"]
    low_ff, high_ff = params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low_ff, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high_ff) * ~(wavelen > old_len / low_ff)
    return torch.where(medium, smoothed, scaled), 1.0, dim


def _init_proportional(params, head_dim, max_pos, seq_len, device):
    # Frequencies for the first `partial_rotary_factor` of the pairs with exponents over the *whole* head_dim, zero
    # frequency (identity rotation) for the rest: every dim is "rotary", the tail by angle 0.
    rotated_pairs = int(params.get("partial_rotary_factor", 1.0) * head_dim // 2)
    inv_freq = 1.0 / (params["rope_theta"] ** _exponents(2 * rotated_pairs, head_dim, device))
    zeros = torch.zeros(head_dim // 2 - rotated_pairs, dtype=torch.float32, device=device)
    return torch.cat((inv_freq, zeros)) / params.get("factor", 1.0), 1.0, head_dim


_INIT = {
    "default": _init_default,
    "linear": _init_linear,
    "dynamic": _init_dynamic,
    "yarn": _init_yarn,
    "longrope": _init_longrope,
    "llama3": _init_llama3,
    "proportional": _init_proportional,
}
