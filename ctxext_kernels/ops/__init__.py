"""Ops layer: RoPE custom ops over the CUDA, Triton, host and reference backends."""

from .attention import attention_backends, rope_attention
from .rope import apply_rope, backends, rope_cos_sin
from .spec import RopeSpec

__all__ = ["RopeSpec", "apply_rope", "attention_backends", "backends", "rope_attention", "rope_cos_sin"]
