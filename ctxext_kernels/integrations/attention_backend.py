"""`attn_implementation="ctxext"`: transformers attention through the fused RoPE + FlashAttention kernels.

`register()` adds `ctxext_attention_forward` to transformers' attention-function registry (`AttentionInterface`) and
the flash-attention mask convention to its mask registry (`AttentionMaskInterface`: no mask at all unless a batch is
padded), so `config._attn_implementation = "ctxext"` routes every attention call here.

The attention modules must hand over *unrotated* q and k: with the model patch active (integrations/patch.py, which
also calls `register()`), a rotary module whose config says `_attn_implementation == "ctxext"` returns (cos, sin)
marked deferred, and the patched `apply_rotary_pos_emb` leaves q and k as they are. The rotation then happens inside the
kernel, from the `position_ids` transformers passes down to the attention function (PoSE ids and packed restarts
included), with the `RopeSpec` of the attention module's config (cached on it as `SPEC_ATTRIBUTE`; a caller may set
it beforehand). Dynamic NTK and LongRoPE take the frequencies of each batch's longest position, as `apply_rope`
does; stock transformers' dynamic NTK also remembers the longest sequence seen earlier, which matters only when a
longer batch precedes a shorter one that is still past the original window.

Calls where the queries do not cover the keys (generation with a KV cache: the cache holds unrotated keys) rotate q and
k with the exact-angle reference and run torch SDPA, taking the keys' positions as contiguous and ending at the last
query's position, which is what decoding produces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import reference
from ..ops.attention import rope_attention
from ..ops.rope import rope_cos_sin
from ..ops.spec import RopeSpec

ATTN_IMPLEMENTATION = "ctxext"
SPEC_ATTRIBUTE = "ctxext_rope_spec"


def register() -> None:
    """Make `attn_implementation="ctxext"` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, ctxext_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, flash_attention_mask)


def ctxext_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature over the fused kernels.

    Args:
        module: the attention module; has `config` (or a preset `ctxext_rope_spec`) and `is_causal`.
        query: unrotated `[B, Hq, S, D]`.
        key, value: `[B, Hk, K, D]` (key unrotated); K == S without a KV cache.
        attention_mask: None, or the 2-D `[B, K]` padding mask of the flash convention (padding is refused).
        scaling: softmax scale (default 1/sqrt(D)).
        kwargs: `position_ids` `[B, S]`; `cu_seq_lens_q` `[num_seqs + 1]` for packed batches (B == 1), else
            packing is read off restarts of the position ids.
    Returns:
        (output `[B, S, Hq, D]`, None): no attention weights are materialized.
    """
    spec = _module_spec(module, query.device)
    if dropout:
        raise NotImplementedError(f"attn_implementation={ATTN_IMPLEMENTATION!r} has no attention dropout (got "
                                  f"{dropout}); set config.attention_dropout = 0")
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise ValueError(f"attn_implementation={ATTN_IMPLEMENTATION!r} takes no padded batches: pack the sequences "
                         "instead (position ids restarting at 0, or cu_seq_lens_q)")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    batch, _, q_len, _ = query.shape
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(key.shape[2] - q_len, key.shape[2], device=query.device)[None]
    if q_len != key.shape[2]:
        return _cached_attention(query, key, value, position_ids, spec, scaling, causal), None

    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None and batch == 1:
        cu_seqlens = _packed_boundaries(position_ids[0])
    if cu_seqlens is not None and batch == 1:
        # "thd" views of the [1, H, T, D] tensors: the kernels take any token/head strides
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
        out = rope_attention(q, k, v, position_ids.reshape(-1), spec, causal=causal, softmax_scale=scaling,
                             layout="thd", cu_seqlens=cu_seqlens)
        return out[None], None
    out = rope_attention(query, key, value, position_ids, spec, causal=causal, softmax_scale=scaling, layout="bhsd")
    return out.transpose(1, 2), None


def _module_spec(module: torch.nn.Module, device: torch.device) -> RopeSpec:
    """The attention module's `RopeSpec`: preset, or built from its config once (only for a patched family)."""
    spec = module.__dict__.get(SPEC_ATTRIBUTE)
    if spec is not None:
        return spec
    from .patch import is_patched

    model_type = getattr(getattr(module, "config", None), "model_type", None)
    if not is_patched(model_type):
        raise RuntimeError(f"attn_implementation={ATTN_IMPLEMENTATION!r} needs the ctxext model patch for model type "
                           f"{model_type!r} (ctxext_kernels.patch(), off under CTXEXT_NO_PATCH=1): unpatched, its RoPE "
                           "step would rotate q and k before the kernel rotates them again")
    spec = RopeSpec.from_hf_config(module.config, device)
    module.__dict__[SPEC_ATTRIBUTE] = spec
    return spec


def _packed_boundaries(positions: torch.Tensor) -> torch.Tensor | None:
    """cu_seqlens `[num_seqs + 1]` of a packed row of position ids `[T]` (a sequence starts where the ids do not
    increase), or None for one sequence. Increasing jumps (PoSE skips) stay inside a sequence."""
    starts = torch.nonzero(positions[1:] <= positions[:-1]).flatten() + 1
    if starts.numel() == 0:
        return None
    total = torch.tensor([0, positions.numel()], device=positions.device)
    return torch.cat((total[:1], starts, total[1:])).to(torch.int32)


def _cached_attention(query, key, value, position_ids, spec, scaling, causal):
    """Rotate q (at its ids) and the cached unrotated keys (contiguous ids ending at the last query's), then SDPA
    with the causal mask aligned to the last key. Returns `[B, S, Hq, D]`."""
    q_len, k_len = query.shape[2], key.shape[2]
    position_ids = position_ids.expand(query.shape[0], q_len)
    key_ids = position_ids[:, -1:] - (k_len - 1) + torch.arange(k_len, device=query.device)
    if bool((key_ids < 0).any()):
        raise ValueError("cached keys would sit at negative positions: the KV cache is longer than the position ids")

    def rotated(x, ids):
        cos, sin = rope_cos_sin(ids, spec)  # [B, S, R] transformers-style: each frequency twice
        half = cos.shape[-1] // 2
        return reference.rotate(x, cos[:, None, :, :half], sin[:, None, :, :half])

    mask = None
    if causal:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    out = F.scaled_dot_product_attention(rotated(query, position_ids), rotated(key, key_ids), value, attn_mask=mask,
                                         scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2)
