"""Ops layer: RoPE custom ops over the CUDA, Triton, host and reference backends."""

from .rope import apply_rope, backends, rope_cos_sin
from .spec import RopeSpec

__all__ = ["RopeSpec", "apply_rope", "backends", "rope_cos_sin"]
