"""ctxext_kernels: exact-angle RoPE kernels (CUDA, Triton), fused RoPE + FlashAttention, a transformers drop-in and
PoSE context-window extension for LLaMA-family models."""

from ._version import __version__
from .ops import RopeSpec, apply_rope, backends, rope_attention, rope_cos_sin

__all__ = ["RopeSpec", "__version__", "apply_rope", "backends", "rope_attention", "rope_cos_sin"]
