"""`attn_implementation="ctxext"`: transformers attention through `rope_attention` with the queries rotated inside
the kernel.

`register()` adds `ctxext_attention_forward` to transformers' attention-function registry (`AttentionInterface`) and
`ctxext_attention_mask` to its mask registry (`AttentionMaskInterface`), so `config._attn_implementation = "ctxext"`
routes every attention call of a patched family here.

Who rotates what: with the model patch active (integrations/patch.py, which also calls `register()`), a rotary module
whose config says `_attn_implementation == "ctxext"` returns (cos, sin) marked deferred, and the patched
`apply_rotary_pos_emb` rotates the keys alone, once, with the RoPE op (`apply_rope(None, k, ...)`) and hands the
queries over unrotated. A KV cache therefore stores rotated keys (as stock transformers' and FlashInfer's do), and a
decode step rotates only its own new keys and queries: `rope_attention(..., k_rotated=True)` turns the queries in the
kernel's prologue, by the query `position_ids` transformers passes down (PoSE skips and packed restarts included).
Both sides use the `RopeSpec` of the model config (cached on the attention module as `SPEC_ATTRIBUTE`); dynamic NTK
and LongRoPE take the frequencies of the batch's longest position on both sides (one host sync each). Stock dynamic
NTK also remembers the longest sequence seen earlier, which matters only when a longer batch precedes a shorter one
that is still past the original window.

What is served (the masks follow transformers' FlashAttention-2 convention: None, or a 2-D `[B, L]` mask of the keys
when some key is padding or, with a preallocated static cache, not written yet):
- no mask: batches of equal-length rows, with or without a KV cache (queries are the rows' last tokens); packed rows
  (`cu_seq_lens_q`/`cu_seq_lens_k`, or a single row whose position ids restart) attend within each sequence;
- a padding mask (left/right padding, static caches): each row's keys start at its first unpadded slot (the kernels'
  `k_leftpad`), outputs at padded queries are 0; a mask with padding between a row's tokens is unpadded to packed
  sequences with `cu_seqlens`/`cu_seqlens_k`, attended and padded back, as transformers' flash path does;
  `is_causal=False` (bidirectional) too;
- sliding windows that cannot cut anything off (window >= the longest sequence of keys; e.g. every decode step of a
  sliding-window cache).
Refused with a named error (never ignored): attention dropout, logit soft-capping, a sliding window shorter than the
keys, 4-D masks, custom mask functions, `output_attentions=True`, and any keyword argument it does not know.

Host syncs: none in the training path (unpadded rows, no mask, increasing or PoSE-skipped position ids, a batch of
more than one row) and none under `torch.compile` with a padding mask, so a training step and a static-cache decode
step each compile with `torch.compile(fullgraph=True)` (a mask with gaps then fails a device-side assert). Eager, a
padding mask costs one sync per forward (gaps? read once per mask, not per layer) and more to unpad one that has
gaps; a single row's position ids are searched for restarts (packing, one sync per layer, like transformers' flash
path); building the mask syncs once per forward when a mask is given (does it pad anything?) or a static cache has
none (how many keys are written? under transformers 4.x: any cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from ..ops.attention import rope_attention
from ..ops.spec import RopeSpec

ATTN_IMPLEMENTATION = "ctxext"
SPEC_ATTRIBUTE = "ctxext_rope_spec"
# Keyword arguments the models pass down to every attention call that do not concern attention: cache and output
# bookkeeping, the loss arguments of *ForCausalLM (`shift_labels`, `ignore_index`, `num_items_in_batch`), and
# max_length_*, only size hints for the flash kernels' launch, which rope_attention derives itself.
_UNRELATED_KWARGS = frozenset({"use_cache", "output_hidden_states", "output_router_logits", "num_items_in_batch",
                               "return_dict", "max_length_q", "max_length_k", "shift_labels", "ignore_index"})
_INSTEAD = "use attn_implementation='sdpa' or 'eager' (with the patch the RoPE step still runs as one fused op)"


def register() -> None:
    """Make `attn_implementation="ctxext"` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, ctxext_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ctxext_attention_mask)


# ------------------------------------------------------------------------------------------------------------- mask
def ctxext_attention_mask(batch_size: int, kv_length: int, kv_offset: int = 0,
                          attention_mask: torch.Tensor | None = None, *, q_length: int | None = None,
                          q_offset: int | torch.Tensor = 0, cache_position: torch.Tensor | None = None,
                          **kwargs) -> torch.Tensor | None:
    """transformers' mask interface: the keys a layer may attend, in the flash-attention convention.

    Args:
        batch_size: B.
        kv_length, kv_offset: the layer's key buffer holds `kv_length` slots from absolute index `kv_offset` (a
            static cache preallocates more slots than it has written).
        attention_mask: bool/int `[B, seen + q_length]` padding mask (1 = a token), or None.
        q_length, q_offset: the queries' count and absolute index of the first (transformers 5.x); a static cache
            gives q_offset as a tensor.
        cache_position: int `[q_length]` the queries' absolute indices (transformers 4.x, instead of q_length,
            q_offset).
        kwargs: `use_vmap=True` (5.x) marks extra mask functions (image tokens and the like): refused.
    Returns:
        None when every slot of the buffer is a written, unpadded key; else bool `[B, L]`, L <= kv_length: the
        first L slots are the written ones (the queries are the last q_length of them), True = a token.
    """
    if kwargs.get("use_vmap"):
        raise NotImplementedError(f"attn_implementation={ATTN_IMPLEMENTATION!r} takes causal, padding and sliding-"
                                  f"window masks only, not extra mask functions (or_mask/and_mask): {_INSTEAD}")
    if attention_mask is not None:
        mask = attention_mask[:, -kv_length:].bool()
        # A static cache (q_offset a tensor) keeps its mask even when full: the compiled forward builds its mask again
        # from this one, and from None it would have to read q_offset on the host.
        static_cache = isinstance(q_offset, torch.Tensor) and cache_position is None
        if (mask.shape[-1] == kv_length and not static_cache and not torch.compiler.is_compiling()
                and bool(mask.all())):
            return None
        return mask
    if cache_position is not None:
        q_length, q_offset = cache_position.shape[0], cache_position[0]
    if kv_length == q_length:  # no past keys: nothing can be missing
        return None
    # Slots written so far: a device tensor for a StaticCache (and for any cache under transformers 4.x), so one
    # sync per forward.
    written = int(q_offset + q_length - kv_offset)
    if written == kv_length:
        return None
    device = kwargs.get("device", cache_position.device if cache_position is not None else None)
    return torch.ones(batch_size, written, dtype=torch.bool, device=device)


# -------------------------------------------------------------------------------------------------------- attention
def ctxext_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             is_causal: bool | None = None, sliding_window: int | None = None,
                             softcap: float | None = None, position_ids: torch.Tensor | None = None,
                             cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                             output_attentions: bool = False, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature over `rope_attention(..., k_rotated=True)`.

    Args:
        module: the attention module; has `config` (or a preset `ctxext_rope_spec`) and `is_causal`.
        query: unrotated `[B, Hq, Sq, D]`.
        key: rotated `[B, Hk, Sk, D]` (Sk >= Sq: a KV cache's keys, the queries being each row's last tokens).
        value: `[B, Hk, Sk, D]`.
        attention_mask: None or the bool `[B, L]` of `ctxext_attention_mask` (L <= Sk: slots past L are ignored).
        dropout: must be 0.
        scaling: softmax scale (default 1/sqrt(D)).
        is_causal: overrides `module.is_causal`.
        sliding_window: served only when it cuts nothing off (>= every sequence's key count).
        softcap: must be None.
        position_ids: int `[B, Sq]` or `[1, Sq]`, the queries' positions.
        cu_seq_lens_q, cu_seq_lens_k: int `[num_seqs + 1]` boundaries of packed sequences (B == 1); without them a
            single row is split where its position ids do not increase.
        output_attentions: must be False (no attention weights are materialised).
    Returns:
        (output `[B, Sq, Hq, D]`, None).
    """
    _refuse_unsupported(dropout, softcap, output_attentions, attention_mask, kwargs)
    if position_ids is None:
        raise ValueError(f"attn_implementation={ATTN_IMPLEMENTATION!r} rotates the queries by the position_ids the "
                         "model passes to its attention layers; got none")
    batch, _, q_len, _ = query.shape
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    spec = _batch_spec(_module_spec(module, query.device), position_ids)
    positions = position_ids.expand(batch, q_len)
    flags = dict(causal=causal, softmax_scale=scaling, k_rotated=True, check_positions=False)

    if attention_mask is not None:
        return _masked_attention(query, key, value, attention_mask, positions, spec, sliding_window, flags), None
    if cu_seq_lens_q is None and batch == 1 and q_len == key.shape[2] > 1:
        cu_seq_lens_q = _packed_boundaries(positions[0])
    if cu_seq_lens_q is None:
        _check_window(sliding_window, key.shape[2], lambda: key.shape[2])
        return rope_attention(query, key, value, positions, spec, layout="bhsd", **flags).transpose(1, 2), None
    if batch != 1:
        raise ValueError(f"cu_seq_lens_q describes sequences packed into one row, got a batch of {batch} rows")
    cu_k = cu_seq_lens_q if cu_seq_lens_k is None else cu_seq_lens_k
    _check_window(sliding_window, key.shape[2], lambda: int((cu_k[1:] - cu_k[:-1]).max()))
    # "thd" views of the [1, H, T, D] tensors: the kernels take any token/head strides
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    out = rope_attention(q, k, v, positions.reshape(-1), spec, layout="thd", cu_seqlens=cu_seq_lens_q,
                         cu_seqlens_k=cu_seq_lens_k, **flags)
    return out[None], None


def _refuse_unsupported(dropout, softcap, output_attentions, attention_mask, kwargs) -> None:
    """Named errors for what the kernels do not compute, before anything runs."""
    name = f"attn_implementation={ATTN_IMPLEMENTATION!r}"
    if dropout:
        raise NotImplementedError(f"{name} has no attention dropout (got {dropout}); set config.attention_dropout = 0 "
                                  f"or {_INSTEAD}")
    if softcap is not None:
        raise NotImplementedError(f"{name} has no attention-logit soft-capping (got softcap={softcap}); use "
                                  "attn_implementation='eager' (sdpa has none either)")
    if output_attentions:
        raise NotImplementedError(f"{name} never materialises attention weights (output_attentions=True); use "
                                  "attn_implementation='eager'")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise NotImplementedError(f"{name} takes 2-D padding masks [batch, keys], got a {attention_mask.dim()}-D mask "
                                  f"of shape {tuple(attention_mask.shape)}; {_INSTEAD}")
    unknown = sorted(set(kwargs) - _UNRELATED_KWARGS)
    if unknown:
        raise NotImplementedError(f"{name} does not know the attention argument(s) {', '.join(unknown)}; {_INSTEAD}")


def _check_window(sliding_window: int | None, key_bound: int, longest_keys) -> None:
    """Refuse a sliding window that would cut keys off. key_bound: an upper bound of every sequence's key count;
    longest_keys(): the exact longest count (may sync; asked only when the bound exceeds the window)."""
    if sliding_window is None or key_bound <= sliding_window:
        return
    longest = longest_keys()
    if longest > sliding_window:
        raise NotImplementedError(f"attn_implementation={ATTN_IMPLEMENTATION!r} has no sliding-window attention: "
                                  f"sliding_window={sliding_window} would cut off keys of a sequence of {longest}; "
                                  f"{_INSTEAD}")


def _masked_attention(query, key, value, mask, positions, spec, sliding_window, flags) -> torch.Tensor:
    """Attention over the keys `mask` `[B, L]` marks: `[B, Sq, Hq, D]`, zero at padded queries.

    The first L key slots are the written ones (a static cache allocates more), the queries are the last Sq of them.
    Each row's keys start at its first marked slot (`k_leftpad`), so left padding, which batched generation uses,
    costs nothing: the kernel attends views of the written slots and reads no data on the host, which keeps a
    static-cache decode step inside one `torch.compile(fullgraph=True)` graph. That is exact unless a query would see
    a padding slot after its row's first key (a gap: right padding followed by more tokens; with `is_causal=False`,
    any padding after the first key). Eager, one host sync per mask (not per layer) finds gaps and such batches take
    `_gathered_attention`; compiled, a device-side assert names them.
    """
    batch, n_heads, q_len, head_dim = query.shape
    key_len = mask.shape[-1]
    if not q_len <= key_len <= key.shape[2]:
        raise ValueError(f"attention_mask covers {key_len} keys, but there are {key.shape[2]} keys and {q_len} "
                         "queries: the mask must cover at least the queries and at most the keys")
    key_mask = mask.bool()
    query_mask = key_mask[:, key_len - q_len:]
    slots = torch.arange(key_len, device=key_mask.device)
    leftpad = torch.where(key_mask, slots, key_len).amin(-1)  # a row with no key: key_len, so it attends nothing

    def gaps() -> torch.Tensor:  # padding slots from a row's first key up to a query (to the end if not causal)
        padding_seen = torch.cumsum(~key_mask, -1) - leftpad[:, None]
        if flags["causal"]:
            return (query_mask & (padding_seen[:, key_len - q_len:] > 0)).any()
        return (query_mask.any(-1) & (padding_seen[:, -1] > 0)).any()

    if torch.compiler.is_compiling():
        torch._assert_async(~gaps(), f"attn_implementation={ATTN_IMPLEMENTATION!r} under torch.compile serves "
                            "left- and right-padded rows, not padding between tokens of a row; run it eagerly")
    elif _has_gaps(mask, (flags["causal"], q_len), gaps):
        return _gathered_attention(query, key, value, key_mask, positions, spec, sliding_window, flags)
    _check_window(sliding_window, key_len, lambda: int((key_len - leftpad).max()))
    out = rope_attention(query, key[:, :, :key_len], value[:, :, :key_len], positions, spec, layout="bhsd",
                         k_leftpad=leftpad.to(torch.int32), **flags).transpose(1, 2)
    return out * query_mask[:, :, None, None]  # right-padded queries saw padding: 0, as the gathered path gives


# mask -> (its version, causal, queries; whether it has gaps): every layer of a forward gets the same mask tensor
_GAPS_SEEN = WeakIdKeyDictionary()  # by identity: tensors compare elementwise


def _has_gaps(mask: torch.Tensor, use: tuple, gaps) -> bool:
    """bool(gaps()), read on the host once per mask and use rather than once per layer."""
    key = (mask._version, *use)
    known = _GAPS_SEEN.get(mask)
    if known is None or known[0] != key:
        known = (key, bool(gaps()))
        _GAPS_SEEN[mask] = known
    return known[1]


def _gathered_attention(query, key, value, key_mask, positions, spec, sliding_window, flags) -> torch.Tensor:
    """`_masked_attention` for any mask: the kept queries and keys gathered into "thd" sequences with their own
    `cu_seqlens`, so each query sees the keys of its row up to itself (causal alignment at the end of each row), and
    scattered back. Host syncs: the token counts of the gathers."""
    batch, n_heads, q_len, head_dim = query.shape
    key_len = key_mask.shape[-1]
    query_mask = key_mask[:, key_len - q_len:]
    _check_window(sliding_window, key_len, lambda: int(key_mask.sum(-1).max()))
    rows_k, slots_k = key_mask.nonzero(as_tuple=True)  # the kept tokens, row after row
    rows_q, slots_q = query_mask.nonzero(as_tuple=True)
    k, v = key.transpose(1, 2)[rows_k, slots_k], value.transpose(1, 2)[rows_k, slots_k]  # [T, H, D]
    q = query.transpose(1, 2)[rows_q, slots_q]
    cu_q, cu_k = (F.pad(keep.sum(-1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
                  for keep in (query_mask, key_mask))
    out = rope_attention(q, k, v, positions[rows_q, slots_q], spec, layout="thd", cu_seqlens=cu_q, cu_seqlens_k=cu_k,
                         **flags)
    return out.new_zeros(batch, q_len, n_heads, head_dim).index_put((rows_q, slots_q), out)


def _module_spec(module: torch.nn.Module, device: torch.device) -> RopeSpec:
    """The attention module's `RopeSpec`: preset, or built from its config once (only for a patched family)."""
    spec = module.__dict__.get(SPEC_ATTRIBUTE)
    if spec is not None:
        return spec
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    if not _family_patched(model_type):
        raise RuntimeError(f"attn_implementation={ATTN_IMPLEMENTATION!r} needs the ctxext model patch for model type "
                           f"{model_type!r} (ctxext_kernels.patch(), off under CTXEXT_NO_PATCH=1): unpatched, its RoPE "
                           "step would rotate the queries before the kernel rotates them again")
    spec = RopeSpec.from_hf_config(module.config, device)
    module.__dict__[SPEC_ATTRIBUTE] = spec
    return spec


@torch.compiler.assume_constant_result  # host state (a lock inside): compiled graphs bake it in
def _family_patched(model_type: str | None) -> bool:
    from .patch import is_patched

    return is_patched(model_type)


def _batch_spec(spec: RopeSpec, position_ids: torch.Tensor) -> RopeSpec:
    """Dynamic NTK / LongRoPE: the frequencies of the batch's longest position (one host sync), which the RoPE op
    also gave the keys from the same position ids; a static spec as it is."""
    if not spec.is_dynamic:
        return spec
    return spec.replace(rope_type="default", inv_freq=spec.inv_freq_for(int(position_ids.max()) + 1))


def _packed_boundaries(positions: torch.Tensor) -> torch.Tensor | None:
    """cu_seqlens `[num_seqs + 1]` of a packed row of position ids `[T]` (a sequence starts where the ids do not
    increase), or None for one sequence. Increasing jumps (PoSE skips) stay inside a sequence. One host sync."""
    starts = torch.nonzero(positions[1:] <= positions[:-1]).flatten() + 1
    if starts.numel() == 0:
        return None
    total = torch.tensor([0, positions.numel()], device=positions.device)
    return torch.cat((total[:1], starts, total[1:])).to(torch.int32)
