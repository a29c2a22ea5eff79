"""A drop-in `LlamaRotaryEmbedding` whose (cos, sin) also tell the patched `apply_rotary_pos_emb` where to find the
fused RoPE kernel.

The rotary module of a transformers model returns `position_embeddings = (cos, sin)`, which the attention layers pass
to `apply_rotary_pos_emb(q, k, cos, sin)`. Here cos and sin are the stock tables: plain `torch.Tensor`s `[B, S,
rotary_dim]` in the hidden states' dtype, computed from exact angles, so anything may index, slice, compare, move,
save or print them. Both carry one `FusedRope` (position ids + the module's frozen `RopeSpec`) as a Python attribute,
and the patched `apply_rotary_pos_emb` (see patch.py) rotates q and k with one fused `apply_rope` launch when it is
handed that untouched pair. Anything derived from the tables (a slice, a copy, another dtype or device, an in-place
edit) is an ordinary tensor and goes through the stock formula, which then rotates by its actual values.

Cost: the tables are built once per model forward (as stock transformers does), not once per layer; under
`torch.compile` nothing reads them when every layer takes the fused path, so the compiler drops them.

No host synchronisation: positions are neither validated nor reduced on the host (the kernels take any position
below 2^24; stock transformers checks none either). The one exception is dynamic NTK, whose frequencies depend on
the longest sequence seen so far, a host-side state: one sync per forward, as in stock transformers. LongRoPE picks
its long or short factors on the device.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..ops import reference
from ..ops.rope import apply_rope
from ..ops.spec import RopeSpec
from .attention_backend import ATTN_IMPLEMENTATION

# Cached on rotary modules (stock ones too, once patched): the spec built from the module's config.
SPEC_CACHE_ATTRIBUTE = "_ctxext_spec"
# Set on the (cos, sin) tensors a patched rotary module returns.
FUSED_ATTRIBUTE = "_ctxext_rope"
# Cached on LongRoPE modules: the frequencies past the original window (the long factors).
LONG_INV_FREQ_ATTRIBUTE = "_ctxext_long_inv_freq"


@dataclasses.dataclass(frozen=True, eq=False)
class FusedRope:
    """What a patched rotary module attaches to the cos and sin it returns.

    Attributes:
        position_ids: int `[B, S]` (or `[1, S]`, broadcast over the batch).
        spec: the frozen spec (rope type "default" with the module's current frequencies and attention scaling).
        deferred: the model attends with `attn_implementation="ctxext"`, whose kernel rotates the queries in its
            prologue: `rotate` then rotates the keys alone (spec: the config's, as the attention kernel's).
        versions: the tables' version counters when they were built (an in-place edit bumps them).
    """

    position_ids: torch.Tensor
    spec: RopeSpec
    deferred: bool
    versions: tuple[int, int]

    def rotate(self, q: torch.Tensor, k: torch.Tensor, unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """`apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)` through the fused kernel.

        q, k: `[B, H, S, D]` (unsqueeze_dim=1) or `[B, S, H, D]` (unsqueeze_dim=2).
        """
        layout = {1: "bhsd", 2: "bshd"}.get(unsqueeze_dim)
        if layout is None:
            raise ValueError(f"unsqueeze_dim must be 1 ([B, H, S, D]) or 2 ([B, S, H, D]), got {unsqueeze_dim}")
        if self.deferred:  # keys turn once, here (a KV cache keeps them rotated); queries inside the attention kernel
            return q, apply_rope(None, k, self.position_ids, self.spec, layout=layout, check_positions=False)[1]
        # No position check: it would cost a host sync per layer (see the module docstring).
        return apply_rope(q, k, self.position_ids, self.spec, layout=layout, check_positions=False)


def fused_rope_of(cos: torch.Tensor, sin: torch.Tensor) -> FusedRope | None:
    """The `FusedRope` behind a (cos, sin) pair, or None where the pair must be read as the tensors it is.

    None unless both are the very tensors a patched rotary module returned, unedited since (checked in eager mode
    only), and nobody asked for gradients through them (the fused kernel rotates by the positions, so it would
    ignore an edit and has no gradient for the tables).

    Raises:
        RuntimeError: such a pair under `attn_implementation="ctxext"`, whose attention kernel rotates by the
            positions anyway (rotating by the tables here as well would rotate twice).
    """
    fused = getattr(cos, FUSED_ATTRIBUTE, None)
    if fused is None or getattr(sin, FUSED_ATTRIBUTE, None) is not fused:
        return None
    # Version counters are runtime values torch.compile cannot guard on: compiled code skips that check.
    edited = not torch.compiler.is_compiling() and (cos._version, sin._version) != fused.versions
    if cos.requires_grad or sin.requires_grad or edited:
        if fused.deferred:
            raise RuntimeError(f"attn_implementation={ATTN_IMPLEMENTATION!r} rotates q and k inside the attention "
                               "kernel from the position ids: it cannot honour cos/sin tables edited in place or "
                               "that need gradients (use another attn_implementation for that)")
        return None
    return fused


def _no_pickled_state():
    return None


def _tables(position_ids: torch.Tensor, spec: RopeSpec, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Stock-layout cos/sin `[..., S, rotary_dim]` (each frequency twice, half-split) of the frozen spec, in dtype.

    (`rope_cos_sin` without its position check, which would sync with the host.)
    """
    cos, sin = reference.rope_angles_cos_sin(position_ids, spec.inv_freq, spec.attention_scaling,
                                             exact=spec.angle == "exact")
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((sin, sin), dim=-1).to(dtype)


def _max_position_plus_one(position_ids: torch.Tensor) -> int:
    """Validate position ids and return max + 1 (one host sync: dynamic NTK only)."""
    lo, hi = torch.stack(torch.aminmax(position_ids)).tolist()
    if lo < 0:
        raise ValueError(f"position_ids must be non-negative, found {lo}")
    if hi >= 1 << 24:
        raise ValueError(f"position_ids must be below 2^24 (exact fp32 integers), found {hi}")
    return hi + 1


def _update_dynamic_ntk(module: nn.Module, spec: RopeSpec, position_ids: torch.Tensor) -> None:
    """transformers' dynamic NTK update: frequencies grow with the longest sequence seen and reset when a sequence
    shorter than the original window comes back."""
    seq_len = _max_position_plus_one(position_ids)
    if seq_len > module.max_seq_len_cached:
        module.inv_freq = spec.inv_freq_for(seq_len).to(module.inv_freq.device)
        module.max_seq_len_cached = seq_len
    if seq_len < module.original_max_seq_len < module.max_seq_len_cached:
        module.original_inv_freq = module.original_inv_freq.to(module.inv_freq.device)
        module.inv_freq = module.original_inv_freq
        module.max_seq_len_cached = module.original_max_seq_len


def _longrope_inv_freq(module: nn.Module, spec: RopeSpec, position_ids: torch.Tensor) -> torch.Tensor:
    """LongRoPE's frequencies for this batch, chosen on the device: the long factors once a position reaches
    `original_max_position_embeddings`, the short ones below. Written into `module.inv_freq` in place (its address
    stays fixed for CUDA graphs), as stock transformers does."""
    original = spec.params["original_max_position_embeddings"]
    long_inv_freq = module.__dict__.get(LONG_INV_FREQ_ATTRIBUTE)
    if long_inv_freq is None or long_inv_freq.device != module.inv_freq.device:
        long_inv_freq = spec.inv_freq_for(original + 1).to(module.inv_freq.device)
        module.__dict__[LONG_INV_FREQ_ATTRIBUTE] = long_inv_freq
    if module.original_inv_freq is module.inv_freq:  # transformers 4.57 aliases them: keep the short set apart
        module.original_inv_freq = module.original_inv_freq.clone()
    short_inv_freq = module.original_inv_freq.to(module.inv_freq.device)
    inv_freq = torch.where(position_ids.max() >= original, long_inv_freq, short_inv_freq)
    with torch.no_grad():
        module.inv_freq.copy_(inv_freq)
    return inv_freq


def module_spec(module: nn.Module) -> RopeSpec:
    """The spec of a rotary module's config (built once and cached on the module)."""
    spec = module.__dict__.get(SPEC_CACHE_ATTRIBUTE)
    if spec is None:
        spec = RopeSpec.from_hf_config(module.config, module.inv_freq.device)
        module.__dict__[SPEC_CACHE_ATTRIBUTE] = spec
    return spec


def fused_rotary_forward(module: nn.Module, x: torch.Tensor, position_ids: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of a (stock or drop-in) rotary module: the stock (cos, sin), each carrying a `FusedRope`.

    Args:
        module: has `config`, `inv_freq`, `original_inv_freq`, `max_seq_len_cached`, `original_max_seq_len`.
        x: the hidden states (only its dtype and device are used).
        position_ids: int `[B, S]`.
    Returns:
        (cos, sin): `[B, S, rotary_dim]` in x's dtype, as stock transformers returns them (from exact angles).
    """
    if position_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"position_ids must be an integer tensor (int32 or int64), got {position_ids.dtype}")
    spec = module_spec(module)
    if spec.rope_type == "dynamic":
        _update_dynamic_ntk(module, spec, position_ids)
        inv_freq = module.inv_freq
    elif spec.rope_type == "longrope":
        inv_freq = _longrope_inv_freq(module, spec, position_ids)
    else:
        inv_freq = module.inv_freq
    # The attention layers see static frequencies: "default" stops apply_rope from re-deriving dynamic ones.
    frozen = spec.replace(rope_type="default", inv_freq=inv_freq.to(x.device, torch.float32),
                          attention_scaling=float(getattr(module, "attention_scaling", spec.attention_scaling)))
    cos, sin = _tables(position_ids, frozen, x.dtype)
    deferred = getattr(module.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION
    # Deferred: the attention kernel turns the queries by the spec of the model config (attention_backend.py), so the
    # keys must turn by that very spec, not by this module's possibly down-cast or remembered frequencies.
    fused = FusedRope(position_ids, spec if deferred else frozen, deferred, (cos._version, sin._version))
    for table in (cos, sin):
        setattr(table, FUSED_ATTRIBUTE, fused)
        # The attribute is for this process only: pickling / torch.save write the plain tensor, as stock's
        # (weights_only loading accepts no FusedRope).
        table.__getstate__ = _no_pickled_state
    return cos, sin


class LlamaRotaryEmbedding(nn.Module):
    """Drop-in for transformers' `LlamaRotaryEmbedding` (every rope type), with exact fp32 angles.

    Same constructor, non-persistent buffers `inv_freq` / `original_inv_freq` (state dicts load unchanged), the same
    dynamic NTK / LongRoPE updates, and `forward(x, position_ids) -> (cos, sin)`: the stock tables `[B, S,
    rotary_dim]`, which the patched `apply_rotary_pos_emb` turns into one fused q+k kernel.
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

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fused_rotary_forward(self, x, position_ids)
