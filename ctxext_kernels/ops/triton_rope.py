"""Triton RoPE kernel: q and k of a tile of tokens rotated in one launch, cos/sin computed once per (token, pair).

One program owns BLOCK_T tokens. It computes their cos/sin (`[BLOCK_T, PAIRS]`, fp32, in registers) once, then walks
the q heads and the k heads BLOCK_H at a time, so the angle math is amortised over all Hq + Hk heads and every byte of
q and k is read and written exactly once. Any strides are taken as they are (transformers hands over transposed views);
only the last dim must be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_configs
from .triton_math import rope_cos_sin, rotate_pair


@triton.jit
def _rotate_heads(x_ptr, out_ptr, sxb, sxs, sxh, sob, sos, soh, n_heads, batch, seq, tok_mask, cos, sin,
                  HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, PAIRS: tl.constexpr, TAIL: tl.constexpr,
                  BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr, COPY_TAIL: tl.constexpr):
    """Rotate all `n_heads` heads of one token tile. batch, seq: `[BLOCK_T, 1, 1]` int64; cos, sin: `[BLOCK_T, 1,
    PAIRS]`."""
    pair = tl.arange(0, PAIRS)[None, None, :]
    if INTERLEAVED:
        first, second = 2 * pair, 2 * pair + 1
    else:
        first, second = pair, pair + ROTARY_DIM // 2
    pair_mask = pair < ROTARY_DIM // 2
    x_row = x_ptr + batch * sxb + seq * sxs
    out_row = out_ptr + batch * sob + seq * sos
    for h0 in range(0, n_heads, BLOCK_H):
        head = (h0 + tl.arange(0, BLOCK_H))[None, :, None].to(tl.int64)
        mask = tok_mask & (head < n_heads) & pair_mask
        x_head = x_row + head * sxh
        out_head = out_row + head * soh
        x1 = tl.load(x_head + first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_head + second, mask=mask, other=0.0).to(tl.float32)
        y1, y2 = rotate_pair(x1, x2, cos, sin)
        tl.store(out_head + first, y1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_head + second, y2.to(out_ptr.dtype.element_ty), mask=mask)
        if COPY_TAIL:  # partial rotary, out of place: the pass-through dims still have to reach the output
            dim = ROTARY_DIM + tl.arange(0, TAIL)[None, None, :]
            tail_mask = tok_mask & (head < n_heads) & (dim < HEAD_DIM)
            tl.store(out_head + dim, tl.load(x_head + dim, mask=tail_mask), mask=tail_mask)


@triton.jit
def rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, inv_freq_ptr, scaling,
                sqb, sqs, sqh, skb, sks, skh, sqob, sqos, sqoh, skob, skos, skoh, spb, sps,
                n_tokens, seqlen, n_q_heads, n_k_heads,
                HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, PAIRS: tl.constexpr, TAIL: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr,
                EXACT: tl.constexpr, FAST: tl.constexpr, COPY_TAIL: tl.constexpr):
    token = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = token < n_tokens
    batch, seq = token // seqlen, token % seqlen
    pos = tl.load(pos_ptr + batch * spb + seq * sps, mask=tok_mask, other=0)
    pair = tl.arange(0, PAIRS)
    inv_freq = tl.load(inv_freq_ptr + pair, mask=pair < ROTARY_DIM // 2, other=0.0)
    cos, sin = rope_cos_sin(pos[:, None], inv_freq[None, :], scaling, EXACT, CONJUGATE, FAST)
    cos, sin = cos[:, None, :], sin[:, None, :]
    batch, seq, tok_mask = batch[:, None, None], seq[:, None, None], tok_mask[:, None, None]
    _rotate_heads(q_ptr, qo_ptr, sqb, sqs, sqh, sqob, sqos, sqoh, n_q_heads, batch, seq, tok_mask, cos, sin,
                  HEAD_DIM, ROTARY_DIM, PAIRS, TAIL, BLOCK_H, INTERLEAVED, COPY_TAIL)
    if n_k_heads > 0:
        _rotate_heads(k_ptr, ko_ptr, skb, sks, skh, skob, skos, skoh, n_k_heads, batch, seq, tok_mask, cos, sin,
                      HEAD_DIM, ROTARY_DIM, PAIRS, TAIL, BLOCK_H, INTERLEAVED, COPY_TAIL)


def rope_forward(q, k, q_out, k_out, positions, inv_freq, scaling: float, interleaved: bool, conjugate: bool,
                 exact: bool) -> None:
    """Launcher contract (see ops/rope.py): q, q_out `[B,S,Hq,D]`, k, k_out `[B,S,Hk,D]` or None, positions `[B,S]`,
    inv_freq fp32 `[R/2]`; writes the rotation into q_out / k_out (which may alias q / k)."""
    batch, seqlen, n_q_heads, head_dim = q.shape
    n_k_heads = 0 if k is None else k.shape[2]
    k, k_out = (q, q_out) if k is None else (k, k_out)  # dummies, never read when n_k_heads == 0
    rotary_dim = 2 * inv_freq.numel()
    pairs = triton.next_power_of_2(rotary_dim // 2)
    config = triton_configs.rope_config(pairs, max(n_q_heads, n_k_heads))
    n_tokens = batch * seqlen
    if n_tokens == 0:
        return
    with triton_configs.device_guard(q):
        rope_kernel[(triton.cdiv(n_tokens, config.block_m),)](
            q, k, q_out, k_out, positions, inv_freq, float(scaling),
            *q.stride()[:3], *k.stride()[:3], *q_out.stride()[:3], *k_out.stride()[:3], *positions.stride(),
            n_tokens, seqlen, n_q_heads, n_k_heads,
            HEAD_DIM=head_dim, ROTARY_DIM=rotary_dim, PAIRS=pairs,
            TAIL=triton.next_power_of_2(max(head_dim - rotary_dim, 1)), BLOCK_T=config.block_m, BLOCK_H=config.block_n,
            INTERLEAVED=interleaved, CONJUGATE=conjugate, EXACT=exact,
            FAST=q.device.type != "cpu",  # hardware cos/sin: compiled GPU code only (the interpreter has no PTX)
            COPY_TAIL=rotary_dim < head_dim and q_out.data_ptr() != q.data_ptr(),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
