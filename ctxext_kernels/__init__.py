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

import os as _os  # noqa: E402

from .integrations import LlamaRotaryEmbedding, is_patched, patch, patch_model, unpatch  # noqa: E402
from .integrations.patch import patch_on_import as _patch_on_import  # noqa: E402
from .ops import RopeSpec, apply_rope, backends, rope_attention, rope_cos_sin  # noqa: E402

__all__ = ["LlamaRotaryEmbedding", "RopeSpec", "__version__", "apply_rope", "backends", "is_patched", "patch",
           "patch_model", "rope_attention", "rope_cos_sin", "unpatch"]

# Importing the package is the monkey-patch: supported transformers families use the fused RoPE from the moment their
# modeling module loads (nothing from transformers is imported here). CTXEXT_NO_PATCH=1 keeps transformers stock;
# patch() / unpatch() switch it explicitly either way.
if _os.environ.get("CTXEXT_NO_PATCH", "0").strip().lower() in ("", "0", "false", "no"):
    _patch_on_import()
