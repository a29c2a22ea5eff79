"""transformers integration: the drop-in rotary embedding, the monkey-patch, the attention backend."""

from .patch import FAMILIES, is_patched, patch, patch_model, patch_on_import, unpatch
from .rotary import FusedRope, LlamaRotaryEmbedding, fused_rope_of

__all__ = ["FAMILIES", "FusedRope", "LlamaRotaryEmbedding", "fused_rope_of", "is_patched", "patch", "patch_model",
           "patch_on_import", "unpatch"]
