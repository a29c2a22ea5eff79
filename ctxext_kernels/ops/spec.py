"""`RopeSpec`: the rotary frequencies of a model, read from its transformers config.

The formulas are written here independently of transformers (tests compare them with transformers'
`ROPE_INIT_FUNCTIONS` for every rope type) and computed with the same fp32 torch operations, so `inv_freq` is
bit-identical to what a stock model uses. Kernels never see the rope type: they take `inv_freq` (fp32,
`[rotary_dim // 2]`) and `attention_scaling`, so every scaling method, present and future, runs through one kernel.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

import numpy as np
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
        rotary_dim: leading dims of each head that are rotated (`head_dim * partial_rotary_factor`, rounded up to
            even as transformers does); the rest pass through unchanged.
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
        Parameters that would give non-finite or silently replaced frequencies (a factor, theta or partial rotary
        factor that is zero, negative or NaN; a missing required key; too few rotary dims; LongRoPE factor lists
        of the wrong length; llama3 high_freq_factor <= low_freq_factor) raise a ValueError (TypeError for a
        non-number) naming the key.
        """
        if angle not in ANGLE_MODES:
            raise ValueError(f"angle must be one of {ANGLE_MODES}, got {angle!r}")
        head_dim, max_pos = _config_sizes(config)
        params = cls._rope_params(config, layer_type)
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"unknown rope type {rope_type!r}; ctxext_kernels supports {', '.join(ROPE_TYPES)}")
        _check_params(rope_type, params, head_dim)
        # Computed on the CPU (as transformers' rotary modules do at init) and checked there, then moved: building a
        # spec never waits on a GPU.
        inv_freq, scaling = _INIT[rope_type](params, head_dim, max_pos, None, None)
        # An odd int(head_dim * partial_rotary_factor) has (dim + 1) / 2 frequencies: transformers rotates dim + 1.
        rotary_dim = 2 * inv_freq.numel()
        if rotary_dim > head_dim:
            raise ValueError(f"head_dim={head_dim} is odd and fully rotated: RoPE rotates pairs of dims")
        if not (np.isfinite(inv_freq.numpy()).all() and math.isfinite(scaling)):
            raise ValueError(f"the rope parameters {params} give non-finite frequencies or attention scaling")
        return cls(rope_type, head_dim, rotary_dim, inv_freq.to(device), float(scaling), params, max_pos, angle)

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
        theta = getattr(config, "rope_theta", None)
        params.setdefault("rope_theta", 10000.0 if theta is None else theta)
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
        inv_freq, _ = _INIT[self.rope_type](self.params, self.head_dim, self.max_position_embeddings, int(seq_len),
                                              self.inv_freq.device)
        return inv_freq


@dataclasses.dataclass
class _PlainConfig:
    head_dim: int
    max_position_embeddings: int
    rope_parameters: dict


# ----------------------------------------------------------------------------------------------------- validation
def _config_sizes(config) -> tuple[int, int]:
    """(head_dim, max_position_embeddings) of a config, named errors for missing or nonsensical values."""
    if config is None:
        raise TypeError("config must be a transformers config (or any object with its attributes), got None")
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None:
        hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
        if not (_is_int(hidden) and _is_int(heads) and heads > 0):
            raise ValueError("config needs head_dim, or hidden_size and num_attention_heads > 0, got "
                             f"hidden_size={hidden!r}, num_attention_heads={heads!r}")
        head_dim = hidden // heads
    max_pos = getattr(config, "max_position_embeddings", None)
    for key, value in (("head_dim", head_dim), ("max_position_embeddings", max_pos)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"config.{key} must be a positive integer, got {value!r}")
    return int(head_dim), int(max_pos)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# Keys each rope type cannot do without (what transformers' validation requires; yarn's factor defaults to
# max_position_embeddings / original_max_position_embeddings, as transformers computes it).
_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",), "longrope": ("short_factor", "long_factor"),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor")}


def _check_params(rope_type: str, params: Mapping[str, Any], head_dim: int) -> None:
    """Refuse rope parameters that would give non-finite or silently substituted frequencies, naming the key.

    transformers' own validation (`PreTrainedConfig.validate_rope`) raises only on missing keys and odd fully rotated
    heads and merely warns about the rest; a config it warns about but can compute (factor < 1, beta_fast <
    beta_slow) is accepted here too.
    """
    def number(key: str, *, low: float, inclusive: bool = False, optional: bool = False) -> float | None:
        value = params.get(key)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"rope parameter {key!r} ({rope_type}) must be a number, got {value!r}")
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            bound = ">=" if inclusive else ">"
            raise ValueError(f"rope parameter {key!r} ({rope_type}) must be a finite number {bound} {low}, got "
                             f"{value!r}")
        return float(value)

    for key in _REQUIRED.get(rope_type, ()):
        if params.get(key) is None:
            raise ValueError(f"rope_type {rope_type!r} needs the rope parameter {key!r}")
    number("rope_theta", low=1.0)  # base^(-2i/d) decreases over the dims only for a base > 1
    partial = number("partial_rotary_factor", low=0.0, inclusive=rope_type == "proportional", optional=True)
    if partial is not None and partial > 1:
        raise ValueError(f"rope parameter 'partial_rotary_factor' must be in (0, 1], got {partial}")
    dim = int(head_dim * (1.0 if partial is None else partial))
    if rope_type != "proportional" and dim < 2:
        raise ValueError(f"head_dim={head_dim} * partial_rotary_factor={partial} leaves {dim} rotary dims; RoPE "
                         "needs at least 2")
    for key in ("factor", "attention_factor"):
        number(key, low=0.0, optional=True)
    if rope_type == "dynamic" and dim == 2:
        raise ValueError("dynamic NTK scales the base by a power dim / (dim - 2): it needs more than 2 rotary dims")
    if rope_type in ("yarn", "longrope", "llama3"):
        original = params.get("original_max_position_embeddings")
        if not _is_int(original) or original < 1:
            raise ValueError(f"rope parameter 'original_max_position_embeddings' ({rope_type}) must be a positive "
                             f"integer, got {original!r}")
    if rope_type == "yarn":
        for key in ("beta_fast", "beta_slow"):  # 0 or None mean the defaults 32 and 1, as in transformers
            number(key, low=0.0, inclusive=True, optional=True)
        for key in ("mscale", "mscale_all_dim"):
            number(key, low=-math.inf, optional=True)
    if rope_type == "llama3":
        low = number("low_freq_factor", low=0.0)
        high = number("high_freq_factor", low=0.0)
        if high <= low:  # the blend divides by high - low
            raise ValueError(f"rope parameter 'high_freq_factor' ({high}) must exceed 'low_freq_factor' ({low})")
    if rope_type == "longrope":
        for key in ("short_factor", "long_factor"):
            factors = params[key]
            if not isinstance(factors, (list, tuple)) or len(factors) != (dim + 1) // 2:
                raise ValueError(f"rope parameter {key!r} (longrope) must be a list of rotary_dim / 2 = "
                                 f"{(dim + 1) // 2} numbers, got {factors!r}")
            if not all(isinstance(f, numbers.Real) and math.isfinite(f) and f > 0 for f in factors):
                raise ValueError(f"rope parameter {key!r} (longrope) must hold finite numbers > 0, got {factors!r}")


# -------------------------------------------------------------------------------------------------- init functions
def _rotary_dim(params, head_dim: int) -> int:
    """transformers' `dim`: the denominator of the frequency exponents (dim + 1 dims rotate when it is odd)."""
    return int(head_dim * params.get("partial_rotary_factor", 1.0))


def _factor_or_window_ratio(params, max_pos: int, original: int) -> float:
    """An explicit factor (0 is refused by `_check_params`, never replaced), else the window ratio, as transformers."""
    factor = params.get("factor")
    return max_pos / original if factor is None else factor


def _init_default(params, head_dim, max_pos, seq_len, device):
    dim = _rotary_dim(params, head_dim)
    return _default_inv_freq(params["rope_theta"], dim, device), 1.0


def _init_linear(params, head_dim, max_pos, seq_len, device):
    inv_freq, _ = _init_default(params, head_dim, max_pos, seq_len, device)
    return inv_freq / params["factor"], 1.0


def _init_dynamic(params, head_dim, max_pos, seq_len, device):
    # NTK-aware base growth once the batch is longer than the trained window; identical to default below it.
    dim = _rotary_dim(params, head_dim)
    factor = params["factor"]
    seq_len = max_pos if seq_len is None else max(seq_len, max_pos)
    base = params["rope_theta"] * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _default_inv_freq(base, dim, device), 1.0


def _init_yarn(params, head_dim, max_pos, seq_len, device):
    # NTK-by-parts: interpolate low frequencies by `factor`, keep high ones, blend linearly between the dims whose
    # wavelength makes beta_fast and beta_slow rotations over the original window; temperature from mscale.
    dim = _rotary_dim(params, head_dim)
    base = params["rope_theta"]
    original = params["original_max_position_embeddings"]
    factor = _factor_or_window_ratio(params, max_pos, original)
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
    return inv_freq, scaling


def _init_longrope(params, head_dim, max_pos, seq_len, device):
    # Per-dimension rescale factors searched offline; the long set applies once the batch exceeds the original window.
    dim = _rotary_dim(params, head_dim)
    original = params["original_max_position_embeddings"]
    factor = _factor_or_window_ratio(params, max_pos, original)
    scaling = params.get("attention_factor")
    if scaling is None:
        scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    key = "long_factor" if seq_len is not None and seq_len > original else "short_factor"
    ext = torch.tensor(params[key], dtype=torch.float32, device=device)
    return 1.0 / (ext * params["rope_theta"] ** _exponents(dim, dim, device)), scaling


def _init_llama3(params, head_dim, max_pos, seq_len, device):
    # Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth blend between two wavelengths.
    inv_freq, _ = _init_default(params, head_dim, max_pos, seq_len, device)
    factor = params["factor"]
    low_ff, high_ff = params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low_ff, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high_ff) * ~(wavelen > old_len / low_ff)
    return torch.where(medium, smoothed, scaled), 1.0


def _init_proportional(params, head_dim, max_pos, seq_len, device):
    # Frequencies for the first `partial_rotary_factor` of the pairs with exponents over the *whole* head_dim, zero
    # frequency (identity rotation) for the rest: every dim is "rotary", the tail by angle 0.
    rotated_pairs = int(params.get("partial_rotary_factor", 1.0) * head_dim // 2)
    inv_freq = 1.0 / (params["rope_theta"] ** _exponents(2 * rotated_pairs, head_dim, device))
    zeros = torch.zeros(head_dim // 2 - rotated_pairs, dtype=torch.float32, device=device)
    factor = params.get("factor")
    return torch.cat((inv_freq, zeros)) / (1.0 if factor is None else factor), 1.0


_INIT = {
    "default": _init_default,
    "linear": _init_linear,
    "dynamic": _init_dynamic,
    "yarn": _init_yarn,
    "longrope": _init_longrope,
    "llama3": _init_llama3,
    "proportional": _init_proportional,
}
