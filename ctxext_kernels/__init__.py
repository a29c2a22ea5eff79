"""ctxext_kernels: exact-angle RoPE kernels (CUDA, Triton), fused RoPE + FlashAttention, a transformers drop-in and
PoSE context-window extension for LLaMA-family models."""

from .ops import RopeSpec, apply_rope, backends, rope_cos_sin

__all__ = ["RopeSpec", "apply_rope", "backends", "rope_cos_sin"]
