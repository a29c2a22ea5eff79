"""ctxext_kernels: exact-angle RoPE kernels (CUDA, Triton), fused RoPE + FlashAttention, a transformers drop-in and
PoSE context-window extension for LLaMA-family models."""

import torch as _torch

from ._version import __version__

# torch.library.custom_op / register_fake / register_autograd arrived in 2.4; the native extension itself is torch-free,
# so every later 2.x works with the same wheel (2.13 is what CI tests).
MIN_TORCH = (2, 4)
if tuple(int(part) for part in _torch.__version__.split(".")[:2]) < MIN_TORCH:
    raise ImportError(f"ctxext_kernels {__version__} needs torch >= {'.'.join(map(str, MIN_TORCH))}, found "
                      f"{_torch.__version__}; upgrade torch (pip install 'torch>=2.4')")

from .ops import RopeSpec, apply_rope, backends, rope_attention, rope_cos_sin  # noqa: E402

__all__ = ["RopeSpec", "__version__", "apply_rope", "backends", "rope_attention", "rope_cos_sin"]
