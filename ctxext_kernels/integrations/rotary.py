"""A drop-in `LlamaRotaryEmbedding` whose output hands the fused RoPE kernel position ids instead of cos/sin tables.

The rotary module of a transformers model returns `position_embeddings = (cos, sin)`, which the attention layers pass
to `apply_rotary_pos_emb(q, k, cos, sin)`. Here both entries are `RopeTable`s: they carry the position ids and a
frozen `RopeSpec` (the module's current frequencies), so the patched `apply_rotary_pos_emb` (see patch.py) rotates q
and k in one fused `apply_rope` launch. Code that reads cos/sin as tensors still works: a table materialises itself,
from exact fp32 angles, on first use.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.rope import apply_rope, rope_cos_sin
from ..ops.spec import RopeSpec
from .attention_backend import ATTN_IMPLEMENTATION

# Cached on rotary modules (stock ones too, once patched): the spec built from the module's config.
SPEC_CACHE_ATTRIBUTE = "_ctxext_spec"


class RopeTable:
    """One of the (cos, sin) pair a patched rotary module returns: position ids + spec, materialised lazily.

    Args:
        position_ids: int `[B, S]`.
        spec: the frozen spec (static frequencies: any dynamic update has already been applied).
        dtype: the dtype stock transformers would have returned (the hidden states' dtype).
        part: "cos" or "sin".
        deferred: the model attends with `attn_implementation="ctxext"`, whose kernel rotates the queries in its
            prologue: `rotate` then rotates the keys alone (spec: the config's, as the attention kernel's).
    """

    def __init__(self, position_ids: torch.Tensor, spec: RopeSpec, dtype: torch.dtype, part: str,
                 deferred: bool = False):
        self.position_ids, self.spec, self.dtype, self.part = position_ids, spec, dtype, part
        self.deferred = deferred
        self._tensor = None

    def tensor(self) -> torch.Tensor:
        """The transformers-style table `[B, S, rotary_dim]` (computed once)."""
        if self._tensor is None:
            cos, sin = rope_cos_sin(self.position_ids, self.spec, dtype=self.dtype)
            self._tensor = cos if self.part == "cos" else sin
        return self._tensor

    def rotate(self, q: torch.Tensor, k: torch.Tensor, unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """`apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)` through the fused kernel.

        q, k: `[B, H, S, D]` (unsqueeze_dim=1) or `[B, S, H, D]` (unsqueeze_dim=2).
        """
        layout = {1: "bhsd", 2: "bshd"}.get(unsqueeze_dim)
        if layout is None:
            raise ValueError(f"unsqueeze_dim must be 1 ([B, H, S, D]) or 2 ([B, S, H, D]), got {unsqueeze_dim}")
        if self.deferred:  # keys turn once, here (a KV cache keeps them rotated); queries inside the attention kernel
            return q, apply_rope(None, k, self.position_ids, self.spec, layout=layout, check_positions=False)[1]
        # Positions were validated once per model forward by the rotary module.
        return apply_rope(q, k, self.position_ids, self.spec, layout=layout, check_positions=False)

    # Anything else reads the materialised tensor: attributes, torch functions and arithmetic.
    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.tensor(), name)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def unwrap(value):
            return value.tensor() if isinstance(value, RopeTable) else value
        args = tuple(unwrap(a) for a in args)
        kwargs = {key: unwrap(value) for key, value in (kwargs or {}).items()}
        return func(*args, **kwargs)

    def __mul__(self, other):
        return self.tensor() * other

    __rmul__ = __mul__

    def __repr__(self):
        return f"RopeTable({self.part}, positions {tuple(self.position_ids.shape)}, {self.spec.rope_type})"


def _max_position_plus_one(position_ids: torch.Tensor) -> int:
    """Validate position ids (one host sync) and return max + 1."""
    if position_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"position_ids must be an integer tensor (int32 or int64), got {position_ids.dtype}")
    lo, hi = torch.aminmax(position_ids)
    lo, hi = int(lo), int(hi)
    if lo < 0:
        raise ValueError(f"position_ids must be non-negative, found {lo}")
    if hi >= 1 << 24:
        raise ValueError(f"position_ids must be below 2^24 (exact fp32 integers), found {hi}")
    return hi + 1


def _update_frequencies(module: nn.Module, spec: RopeSpec, seq_len: int) -> None:
    """transformers' `dynamic_rope_update`, with frequencies from the spec.

    dynamic NTK: frequencies grow with the longest sequence seen and reset when a sequence shorter than the original
    window comes back. LongRoPE: the long factors past `original_max_position_embeddings`, the short ones below.
    """
    if spec.rope_type == "dynamic":
        if seq_len > module.max_seq_len_cached:
            module.inv_freq = spec.inv_freq_for(seq_len).to(module.inv_freq.device)
            module.max_seq_len_cached = seq_len
        if seq_len < module.original_max_seq_len < module.max_seq_len_cached:
            module.original_inv_freq = module.original_inv_freq.to(module.inv_freq.device)
            module.inv_freq = module.original_inv_freq
            module.max_seq_len_cached = module.original_max_seq_len
    elif spec.rope_type == "longrope":
        original = spec.params.get("original_max_position_embeddings", module.original_max_seq_len)
        if seq_len > original:
            module.inv_freq = spec.inv_freq_for(seq_len).to(module.inv_freq.device)
        else:
            module.inv_freq = module.original_inv_freq.to(module.inv_freq.device)


def module_spec(module: nn.Module) -> RopeSpec:
    """The spec of a rotary module's config (built once and cached on the module)."""
    spec = module.__dict__.get(SPEC_CACHE_ATTRIBUTE)
    if spec is None:
        spec = RopeSpec.from_hf_config(module.config, module.inv_freq.device)
        module.__dict__[SPEC_CACHE_ATTRIBUTE] = spec
    return spec


def fused_rotary_forward(module: nn.Module, x: torch.Tensor, position_ids: torch.Tensor
                         ) -> tuple[RopeTable, RopeTable]:
    """Forward of a (stock or drop-in) rotary module: validate positions, update dynamic frequencies, return tables.

    Args:
        module: has `config`, `inv_freq`, `original_inv_freq`, `max_seq_len_cached`, `original_max_seq_len`.
        x: the hidden states (only its dtype and device are used).
        position_ids: int `[B, S]`.
    Returns:
        (cos, sin) as `RopeTable`s for the patched `apply_rotary_pos_emb`.
    """
    spec = module_spec(module)
    if not torch.compiler.is_compiling():
        seq_len = _max_position_plus_one(position_ids)
        if spec.is_dynamic:
            _update_frequencies(module, spec, seq_len)
    # The attention layers see static frequencies: "default" stops apply_rope from re-deriving dynamic ones.
    frozen = spec.replace(rope_type="default", inv_freq=module.inv_freq.to(x.device, torch.float32),
                          attention_scaling=float(getattr(module, "attention_scaling", spec.attention_scaling)))
    deferred = getattr(module.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION
    # Deferred: the attention kernel turns the queries by the spec of the model config (attention_backend.py), so the
    # keys must turn by that very spec, not by this module's possibly down-cast or remembered frequencies.
    table_spec = spec if deferred else frozen
    return tuple(RopeTable(position_ids, table_spec, x.dtype, part, deferred) for part in ("cos", "sin"))


class LlamaRotaryEmbedding(nn.Module):
    """Drop-in for transformers' `LlamaRotaryEmbedding` (every rope type), with exact fp32 angles.

    Same constructor, non-persistent buffers `inv_freq` / `original_inv_freq` (state dicts load unchanged), the same
    dynamic NTK / LongRoPE updates, and `forward(x, position_ids) -> (cos, sin)`: `RopeTable`s that the patched
    `apply_rotary_pos_emb` turns into one fused q+k kernel, and that materialise `[B, S, rotary_dim]` tensors for any
    other reader.
    """

    def __init__(self, config, device=None):
        super().__init__()
        self.config = config
        spec = RopeSpec.from_hf_config(config, device)
        self.__dict__[SPEC_CACHE_ATTRIBUTE] = spec
        self.rope_type = spec.rope_type
        self.max_seq_len_cached = self.original_max_seq_len = spec.max_position_embeddings
        self.attention_scaling = spec.attention_scaling
        self.register_buffer("inv_freq", spec.inv_freq.clone(), persistent=False)
        self.register_buffer("original_inv_freq", spec.inv_freq.clone(), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[RopeTable, RopeTable]:
        return fused_rotary_forward(self, x, position_ids)
