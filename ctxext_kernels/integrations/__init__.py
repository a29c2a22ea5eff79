"""transformers integration: the drop-in rotary embedding, the monkey-patch, the attention backend."""

from .patch import FAMILIES, is_patched, patch, patch_model, patch_on_import, unpatch
from .rotary import LlamaRotaryEmbedding, RopeTable

__all__ = ["FAMILIES", "LlamaRotaryEmbedding", "RopeTable", "is_patched", "patch", "patch_model", "patch_on_import",
           "unpatch"]
