"""Monkey-patch transformers so every supported model family rotates q and k with one fused kernel.

For each family, two objects of `transformers.models.<family>.modeling_<family>` are replaced:
- `<Family>RotaryEmbedding.forward` -> `fused_rotary_forward` (the stock cos/sin tables, each carrying the position
  ids + spec as a `FusedRope`; a class attribute, so models built before the patch are covered too);
- the module-level `apply_rotary_pos_emb` -> a wrapper that sends such an untouched (cos, sin) pair to `apply_rope`
  and any other cos/sin tensors to the original function.
Patching also registers `attn_implementation="ctxext"` (attention_backend.py), under which the rotation moves into
the fused attention kernel. `patch_on_import()` (what `import ctxext_kernels` runs) patches families already loaded
and hooks the import of the others. Every replaced object is recorded as (owner, attribute, original) so `unpatch()`
puts the exact originals back.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
import warnings

import torch

from .attention_backend import register as register_attention_backend
from .rotary import fused_rope_of, fused_rotary_forward

SUPPORTED_TRANSFORMERS = ((4, 57), (6, 0))  # [4.57, 6.0): 4.57.x and every 5.x


@dataclasses.dataclass(frozen=True)
class Family:
    """Where a model family keeps its RoPE: `transformers.models.<name>.modeling_<name>.<rotary_class>`."""

    name: str
    rotary_class: str
    note: str = ""

    @property
    def module_name(self) -> str:
        return f"transformers.models.{self.name}.modeling_{self.name}"


FAMILIES = {family.name: family for family in (
    Family("llama", "LlamaRotaryEmbedding"),
    Family("mistral", "MistralRotaryEmbedding"),
    Family("qwen2", "Qwen2RotaryEmbedding"),
    Family("qwen3", "Qwen3RotaryEmbedding", "q/k RMSNorm before RoPE (unchanged: the patch only replaces RoPE)"),
    Family("phi3", "Phi3RotaryEmbedding", "partial rotary, LongRoPE short/long factors"),
    Family("gemma", "GemmaRotaryEmbedding"),
    Family("gemma2", "Gemma2RotaryEmbedding"),
    Family("granite", "GraniteRotaryEmbedding"),
    Family("olmo", "OlmoRotaryEmbedding", "clamps q/k/v before RoPE (unchanged)"),
    Family("olmo2", "Olmo2RotaryEmbedding", "q/k RMSNorm before RoPE (unchanged)"),
)}

_lock = threading.RLock()
_originals: list[tuple[object, str, object]] = []  # (owner, attribute, original), in patch order
_patched_families: set[str] = set()
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _warn_unsupported_family(name: str) -> None:
    _warn_once(name, f"ctxext_kernels: model family {name!r} is not supported (supported: {', '.join(FAMILIES)}); "
                     f"it keeps stock RoPE")


def transformers_supported() -> bool:
    """True when the installed transformers is in the supported range (warns once otherwise)."""
    try:
        import transformers
    except ImportError:
        return False
    version = tuple(int(part) for part in transformers.__version__.split(".")[:2] if part.isdigit())
    low, high = SUPPORTED_TRANSFORMERS
    if not low <= version < high:
        _warn_once("version", f"ctxext_kernels: transformers {transformers.__version__} is outside the supported "
                              f"range (4.57.x and 5.x); models are left unpatched (stock RoPE)")
        return False
    return True


def fused_apply_rotary_pos_emb(original):
    """`apply_rotary_pos_emb` that sends the (cos, sin) of a patched rotary module to the fused kernel and any other
    tables to `original`."""
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        fused = fused_rope_of(cos, sin)
        if fused is not None:
            unsqueeze_dim = kwargs.get("unsqueeze_dim", args[-1] if args else 1)
            return fused.rotate(q, k, unsqueeze_dim)
        return original(q, k, cos, sin, *args, **kwargs)
    apply_rotary_pos_emb.__wrapped_by_ctxext__ = True
    return apply_rotary_pos_emb


def _set(owner, attribute: str, value) -> None:
    _originals.append((owner, attribute, owner.__dict__[attribute]))
    setattr(owner, attribute, value)


def _patch_family(family: Family) -> bool:
    try:
        module = importlib.import_module(family.module_name)
        rotary = getattr(module, family.rotary_class)
        original_apply = module.apply_rotary_pos_emb
    except (ImportError, AttributeError) as error:
        _warn_once(family.name, f"ctxext_kernels: model family {family.name!r} not patched: this transformers has "
                                f"no {family.module_name}.{family.rotary_class} / apply_rotary_pos_emb ({error})")
        return False
    _set(rotary, "forward", fused_rotary_forward)
    _set(module, "apply_rotary_pos_emb", fused_apply_rotary_pos_emb(original_apply))
    return True


def patch(models: list[str] | None = None) -> list[str]:
    """Patch the RoPE of the given model families (default: every one in `FAMILIES`); idempotent, thread-safe.

    Args:
        models: family names (`config.model_type`, e.g. ["llama", "qwen2"]). Unknown names warn once and are skipped.
    Returns:
        the families patched after the call.
    """
    with _lock:
        if not transformers_supported():
            return sorted(_patched_families)
        for name in FAMILIES if models is None else models:
            family = FAMILIES.get(name)
            if family is None:
                _warn_unsupported_family(name)
            elif name not in _patched_families and _patch_family(family):
                _patched_families.add(name)
        if _patched_families:
            register_attention_backend()
        return sorted(_patched_families)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches a family right after transformers imports its modeling module, so `import ctxext_kernels` costs no
    transformers import: families load lazily (AutoModel imports one per model type) and get patched then."""

    def find_spec(self, fullname, path, target=None):
        family = _FAMILY_BY_MODULE.get(fullname)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path) if family else None
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return None
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            patch([family])
        spec.loader.exec_module = exec_module  # this spec's own loader instance
        return spec


_FAMILY_BY_MODULE = {family.module_name: name for name, family in FAMILIES.items()}
_import_hook = _PatchOnImport()


def patch_on_import() -> list[str]:
    """Patch every family whose modeling module is already imported, and each other one when it gets imported
    (what `import ctxext_kernels` does unless CTXEXT_NO_PATCH=1). Returns the families patched now."""
    with _lock:
        if _import_hook not in sys.meta_path:
            sys.meta_path.insert(0, _import_hook)
        loaded = [name for module, name in _FAMILY_BY_MODULE.items() if module in sys.modules]
        return patch(loaded) if loaded else sorted(_patched_families)


def unpatch() -> None:
    """Restore every object the patch replaced (the exact originals), newest first, and stop patching on import."""
    with _lock:
        if _import_hook in sys.meta_path:
            sys.meta_path.remove(_import_hook)
        while _originals:
            owner, attribute, original = _originals.pop()
            setattr(owner, attribute, original)
        _patched_families.clear()


def is_patched(model_type: str | None = None) -> bool:
    """Whether any family (or the given one) is patched."""
    with _lock:
        return bool(_patched_families) if model_type is None else model_type in _patched_families


def patch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Patch the families of the rotary modules inside an already built model (PEFT wrappers included).

    Walks `model.modules()`; a rotary module of an unsupported family warns once and keeps stock RoPE.
    Returns the model (patched in place: the fused path lives on the classes, so no weights are touched).
    """
    found = set()
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            family = type(module).__module__.rsplit(".modeling_", 1)[-1]
            found.add(family)
    supported = [name for name in found if name in FAMILIES]
    for name in found - set(supported):
        _warn_unsupported_family(name)
    if supported:
        patch(supported)
    return model
