"""Fused RoPE + FlashAttention-2 in Triton, forward and backward, on keys that already carry their rotation.

Keys are rotated once, outside (the RoPE op, bandwidth-bound, Hq/Hk times less data than q under GQA), so every K
loop here is the plain FlashAttention-2 loop. The forward rotates its Q tile in the prologue, once per Q block:
each column d turns with its rotation partner (`x'[d] = x[d] cos + sign(d) x[partner(d)] sin`, the partner read as a
second, cached load of the same rows) by the exact angle of its token's position (`triton_math`, the RoPE op's
math; hardware cos/sin on GPUs) and is rounded to the input dtype, exactly what a separate RoPE pass would have
written. The backward works on q rotated once by the RoPE op: the dQ kernel rotates its fp32 accumulator back by
the negative angle in its epilogue (partner columns via `tl.gather`); the dK/dV kernel is the plain
FlashAttention-2 one (its dK is w.r.t. the rotated keys; whoever rotated them rotates it back).

Tensors are canonical views: q, out `[B, Sq, Hq, D]`, k, v `[B, Sk, Hk, D]` with any strides and a contiguous last
dim, Sk >= Sq; positions (the queries') `[B, Sq]`. Packed batches have B == 1 and `cu_seqlens_q` / `cu_seqlens_k`
`[num_seqs + 1]`; batched keys may start after per-row left padding (`k_leftpad` `[B]`, flash-attn's `cache_leftpad`:
row b's keys are slots k_leftpad[b] ... Sk-1). Causal masking follows token order inside each sequence, not position
ids (PoSE ids jump), aligned bottom-right: query i sees keys j <= i + Lk - Lq (a query that sees none: output 0).
The log-sum-exp (base 2) and the softmax correction term live in fp32 `[B, Sq, Hq]`. Any head_dim up to 256: tiles
are padded to the next power of two with masked columns.

No launch reads anything back to the host: the grid is sized from shapes alone (see `_tile`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_configs
from .triton_math import rope_cos_sin

LOG2E = 1.4426950408889634
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_SEQ_CHUNK = tl.constexpr(256)


# ---------------------------------------------------------------------------------------------- tiles and rows
@triton.jit
def _tile(cu_ptr, n_seqs, BLOCK: tl.constexpr, VARLEN: tl.constexpr):
    """(sequence, row block) of this program.

    Axis 0 enumerates row blocks last first (causal: the longest rows start first). Packed (VARLEN), it spans every
    sequence: sequence i owns the blocks from cdiv(cu[i], BLOCK) + i on, at least the cdiv(len_i, BLOCK) it needs,
    so a grid of cdiv(total, BLOCK) + n_seqs programs covers all without reading the lengths on the host; a program
    finds its sequence by counting the sequences that start at or before it. Otherwise axis 2 is the batch."""
    block = tl.num_programs(0) - 1 - tl.program_id(0)
    if VARLEN:
        count = tl.zeros([], tl.int32)
        for s0 in range(0, n_seqs, _SEQ_CHUNK):
            s = s0 + tl.arange(0, _SEQ_CHUNK)
            first = tl.cdiv(tl.load(cu_ptr + s, mask=s < n_seqs, other=0), BLOCK) + s
            count += tl.sum(((s < n_seqs) & (first <= block)).to(tl.int32))
        seq = count - 1
        return seq, block - tl.cdiv(tl.load(cu_ptr + seq), BLOCK) - seq
    return tl.program_id(2), block


@triton.jit
def _bounds(cu_ptr, seq, seqlen, VARLEN: tl.constexpr, LEFTPAD: tl.constexpr):
    """(first token as int64, for offsets; length) of sequence `seq`. LEFTPAD (batched keys only): `cu_ptr` holds
    each row's count of left-padding slots, which the row's keys start after."""
    if VARLEN:
        start = tl.load(cu_ptr + seq)
        return start.to(tl.int64), tl.load(cu_ptr + seq + 1) - start
    if LEFTPAD:
        # the clamp (a no-op on checked inputs) also kept ptxas from capping sm_86's bf16 d128 forward at 128
        # registers, where it spilled
        start = tl.minimum(tl.load(cu_ptr + seq), seqlen)
        return start.to(tl.int64), seqlen - start
    return tl.zeros([], tl.int64), seqlen


@triton.jit
def _load_rows(row_ptrs, row_mask, DIM: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS_MASKED: tl.constexpr):
    """Tile `[BLOCK, DIM]` of the rows `row_ptrs` `[BLOCK, 1]`; padded columns (and rows off row_mask) read 0."""
    dim = tl.arange(0, DIM)[None, :]
    if DIM == HEAD_DIM:
        if ROWS_MASKED:
            return tl.load(row_ptrs + dim, mask=row_mask[:, None], other=0.0)
        return tl.load(row_ptrs + dim)
    if ROWS_MASKED:
        return tl.load(row_ptrs + dim, mask=row_mask[:, None] & (dim < HEAD_DIM), other=0.0)
    return tl.load(row_ptrs + dim, mask=dim < HEAD_DIM, other=0.0)


@triton.jit
def _store_rows(row_ptrs, row_mask, x, DIM: tl.constexpr, HEAD_DIM: tl.constexpr):
    dim = tl.arange(0, DIM)[None, :]
    x = x.to(row_ptrs.dtype.element_ty)
    if DIM == HEAD_DIM:
        tl.store(row_ptrs + dim, x, mask=row_mask[:, None])
    else:
        tl.store(row_ptrs + dim, x, mask=row_mask[:, None] & (dim < HEAD_DIM))


# -------------------------------------------------------------------------------------------------- rotation
@triton.jit
def _columns(DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Per column d `[DIM]`: the frequency index of its pair, its rotation partner, the sign of the partner's term
    (x'[d] = x[d] cos + sign x[partner] sin) and whether it rotates (dims past ROTARY_DIM pass through)."""
    d = tl.arange(0, DIM)
    rotary = d < ROTARY_DIM
    if INTERLEAVED:
        pair, partner = d // 2, d ^ 1
        sign = tl.where(d % 2 == 0, -1.0, 1.0)
    else:
        lower = d < ROTARY_DIM // 2
        pair = tl.where(lower, d, d - ROTARY_DIM // 2)
        partner = tl.where(lower, d + ROTARY_DIM // 2, d - ROTARY_DIM // 2)
        sign = tl.where(lower, -1.0, 1.0)
    return tl.where(rotary, pair, 0), tl.where(rotary, partner, d), sign, rotary


@triton.jit
def _turn(x, x_partner, pos, inv_freq_ptr, scaling, DIM: tl.constexpr, ROTARY_DIM: tl.constexpr,
          INTERLEAVED: tl.constexpr, EXACT: tl.constexpr, FAST: tl.constexpr, SCALED: tl.constexpr,
          CONJUGATE: tl.constexpr):
    """x `[BLOCK, DIM]` (fp32) rotated by the angles of its rows' positions pos `[BLOCK]` (CONJUGATE: by their
    negatives); x_partner holds x's partner columns (`_columns`). Pass-through dims keep cos 1, sin 0, unscaled.

    cos/sin are computed once per pair (`[BLOCK, DIM/2]`, the angle math is most of the rotation's cost) and then
    spread to the pair's two columns: by a register join when pairs and columns line up (interleaved, or half-split
    over the whole padded tile), else by a gather."""
    pair = tl.arange(0, DIM // 2)
    rotary_pair = pair < ROTARY_DIM // 2
    inv_freq = tl.load(inv_freq_ptr + pair, mask=rotary_pair, other=0.0)
    cos, sin = rope_cos_sin(pos[:, None], inv_freq[None, :], scaling, EXACT, CONJUGATE, FAST, SCALED)
    if INTERLEAVED or ROTARY_DIM == DIM:
        if ROTARY_DIM < DIM:  # interleaved partial rotary: the tail pairs pass through unscaled
            cos = tl.where(rotary_pair[None, :], cos, 1.0)
            sin = tl.where(rotary_pair[None, :], sin, 0.0)
        # pair j sits at columns (2j, 2j + 1) or (j, j + DIM/2); the first column's partner term is -x2 sin
        cos = _spread(cos, cos, INTERLEAVED)
        sin = _spread(-sin, sin, INTERLEAVED)
    else:
        column_pair, _, sign, rotary = _columns(DIM, ROTARY_DIM, INTERLEAVED)
        columns = tl.broadcast_to(column_pair[None, :], x.shape)
        cos = tl.where(rotary[None, :], tl.gather(cos, columns, 1), 1.0)
        sin = tl.where(rotary[None, :], tl.gather(sin, columns, 1) * sign[None, :], 0.0)
    return x * cos + x_partner * sin


@triton.jit
def _spread(first, second, INTERLEAVED: tl.constexpr):
    """`[BLOCK, P]` values of the first and second columns of P pairs -> `[BLOCK, 2P]` in column order."""
    both = tl.join(first, second)  # [BLOCK, P, 2]
    if not INTERLEAVED:
        both = tl.permute(both, [0, 2, 1])
    return tl.reshape(both, [first.shape[0], 2 * first.shape[1]])


@triton.jit
def _turn_back(x, pos, inv_freq_ptr, scaling, DIM: tl.constexpr, ROTARY_DIM: tl.constexpr,
               INTERLEAVED: tl.constexpr, EXACT: tl.constexpr, FAST: tl.constexpr, SCALED: tl.constexpr):
    """A gradient `[BLOCK, DIM]` (fp32, in registers) w.r.t. rotated rows as the gradient w.r.t. the unrotated ones:
    the rotation's transpose is the rotation by the negative angle."""
    _, partner, _, _ = _columns(DIM, ROTARY_DIM, INTERLEAVED)
    x_partner = tl.gather(x, tl.broadcast_to(partner[None, :], x.shape), 1)
    return _turn(x, x_partner, pos, inv_freq_ptr, scaling, DIM, ROTARY_DIM, INTERLEAVED, EXACT, FAST, SCALED, True)


@triton.jit
def _mma(x, dtype, MMA_DTYPE: tl.constexpr):
    """A dot operand: rounded to the input dtype (what a separate pass would have stored), then held as MMA_DTYPE."""
    return x.to(dtype).to(MMA_DTYPE)


# ---------------------------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_rows, v_rows, sks, svs, rows_m, lo, hi, k_len, offset, qk_scale,
               DIM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over the K blocks [lo, hi). MASKED: blocks crossing the causal diagonal or the keys' end
    (otherwise every key is visible to every row and no mask is computed)."""
    dtype = k_rows.dtype.element_ty
    for n0 in range(lo, hi, BLOCK_N):
        rows_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = rows_n < k_len
        k = _load_rows(k_rows + rows_n[:, None].to(tl.int64) * sks, mask_n, DIM, HEAD_DIM, MASKED).to(MMA_DTYPE)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            keep = mask_n[None, :]
            if CAUSAL:
                keep = keep & (rows_n[None, :] <= rows_m[:, None] + offset)
            scores = tl.where(keep, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see no key yet: p = 0, alpha = 0
        else:
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = m_new
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_rows + rows_n[:, None].to(tl.int64) * svs, mask_n, DIM, HEAD_DIM, MASKED).to(MMA_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(_mma(p, dtype, MMA_DTYPE), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, pos_ptr, inv_freq_ptr, cu_q_ptr, cu_k_ptr, scaling, qk_scale,
                sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh, slb, sls, spb, sps,
                seqlen_q, seqlen_k, n_seqs, group,
                HEAD_DIM: tl.constexpr, DIM: tl.constexpr, ROTARY_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
                LEFTPAD: tl.constexpr, INTERLEAVED: tl.constexpr, EXACT: tl.constexpr, FAST: tl.constexpr,
                SCALED: tl.constexpr, ROTATE: tl.constexpr,
                MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    head = tl.program_id(1)
    seq, m_block = _tile(cu_q_ptr, n_seqs, BLOCK_M, VARLEN)
    q_start, q_len = _bounds(cu_q_ptr, seq, seqlen_q, VARLEN, False)
    k_start, k_len = _bounds(cu_k_ptr, seq, seqlen_k, VARLEN, LEFTPAD)
    if m_block * BLOCK_M < q_len:
        batch = 0 if VARLEN else seq.to(tl.int64)
        kv_head = (head // group).to(tl.int64)
        rows_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = rows_m < q_len
        tok_m = q_start + rows_m
        q_rows = q_ptr + batch * sqb + tok_m[:, None] * sqs + head * sqh
        q = _load_rows(q_rows, mask_m, DIM, HEAD_DIM, True)
        if ROTATE:  # the prologue: once per Q block, outside the K loop
            _, partner, _, _ = _columns(DIM, ROTARY_DIM, INTERLEAVED)
            q_partner = tl.load(q_rows + partner[None, :], mask=mask_m[:, None] & (partner < HEAD_DIM)[None, :],
                                other=0.0)
            pos = tl.load(pos_ptr + batch * spb + tok_m * sps, mask=mask_m, other=0)
            q = _turn(q.to(tl.float32), q_partner.to(tl.float32), pos, inv_freq_ptr, scaling, DIM, ROTARY_DIM,
                      INTERLEAVED, EXACT, FAST, SCALED, False)
        q = _mma(q, q_ptr.dtype.element_ty, MMA_DTYPE)

        k_rows = k_ptr + batch * skb + k_start * sks + kv_head * skh
        v_rows = v_ptr + batch * svb + k_start * svs + kv_head * svh
        offset = k_len - q_len  # bottom-right alignment: row i sees keys j <= i + offset
        if CAUSAL:
            end = tl.minimum(k_len, (m_block + 1) * BLOCK_M + offset)
            full = tl.maximum(0, tl.minimum(k_len, m_block * BLOCK_M + offset + 1)) // BLOCK_N * BLOCK_N
        else:
            end = k_len
            full = k_len // BLOCK_N * BLOCK_N
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DIM], tl.float32)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_rows, v_rows, sks, svs, rows_m, 0, full, k_len, offset,
                                   qk_scale, DIM, HEAD_DIM, BLOCK_N, False, CAUSAL, MMA_DTYPE, DOT_PRECISION)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_rows, v_rows, sks, svs, rows_m, full, end, k_len, offset,
                                   qk_scale, DIM, HEAD_DIM, BLOCK_N, True, CAUSAL, MMA_DTYPE, DOT_PRECISION)
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # rows that see no key: output 0
        _store_rows(out_ptr + batch * sob + tok_m[:, None] * sos + head * soh, mask_m, acc / l_safe[:, None], DIM,
                    HEAD_DIM)
        tl.store(lse_ptr + batch * slb + tok_m * sls + head, m_i + tl.log2(l_safe), mask=mask_m)


# --------------------------------------------------------------------------------------------------- backward
@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_rows, v_rows, sks, svs, rows_m, lo, hi, k_len, offset, qk_scale,
              DIM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dQ (w.r.t. the rotated q, unscaled) accumulated over the K blocks [lo, hi); MASKED as in `_fwd_inner`."""
    dtype = k_rows.dtype.element_ty
    for n0 in range(lo, hi, BLOCK_N):
        rows_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = rows_n < k_len
        k = _load_rows(k_rows + rows_n[:, None].to(tl.int64) * sks, mask_n, DIM, HEAD_DIM, MASKED).to(MMA_DTYPE)
        v = _load_rows(v_rows + rows_n[:, None].to(tl.int64) * svs, mask_n, DIM, HEAD_DIM, MASKED).to(MMA_DTYPE)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            keep = mask_n[None, :]
            if CAUSAL:
                keep = keep & (rows_n[None, :] <= rows_m[:, None] + offset)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = _mma(p * (dp - delta[:, None]), dtype, MMA_DTYPE)
        dq += tl.dot(ds, k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, out_ptr, dq_ptr, lse_ptr, delta_ptr, pos_ptr, inv_freq_ptr,
                   cu_q_ptr, cu_k_ptr, scaling, qk_scale, sm_scale,
                   sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh, sob, sos, soh, sdqb, sdqs, sdqh,
                   slb, sls, spb, sps, seqlen_q, seqlen_k, n_seqs, group,
                   HEAD_DIM: tl.constexpr, DIM: tl.constexpr, ROTARY_DIM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
                   LEFTPAD: tl.constexpr, INTERLEAVED: tl.constexpr, EXACT: tl.constexpr, FAST: tl.constexpr,
                   SCALED: tl.constexpr, ROTATE: tl.constexpr,
                   MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dQ of one Q block of one q head (q already rotated), rotated back in the epilogue. Runs first: it also writes
    the rows' softmax correction delta = rowsum(dO * O) for the dK/dV kernel."""
    head = tl.program_id(1)
    seq, m_block = _tile(cu_q_ptr, n_seqs, BLOCK_M, VARLEN)
    q_start, q_len = _bounds(cu_q_ptr, seq, seqlen_q, VARLEN, False)
    k_start, k_len = _bounds(cu_k_ptr, seq, seqlen_k, VARLEN, LEFTPAD)
    if m_block * BLOCK_M < q_len:
        batch = 0 if VARLEN else seq.to(tl.int64)
        kv_head = (head // group).to(tl.int64)
        rows_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = rows_m < q_len
        tok_m = q_start + rows_m
        q = _load_rows(q_ptr + batch * sqb + tok_m[:, None] * sqs + head * sqh, mask_m, DIM, HEAD_DIM, True)
        do = _load_rows(do_ptr + batch * sdob + tok_m[:, None] * sdos + head * sdoh, mask_m, DIM, HEAD_DIM, True)
        out = _load_rows(out_ptr + batch * sob + tok_m[:, None] * sos + head * soh, mask_m, DIM, HEAD_DIM, True)
        delta = tl.sum(do.to(tl.float32) * out.to(tl.float32), 1)
        tl.store(delta_ptr + batch * slb + tok_m * sls + head, delta, mask=mask_m)
        lse = tl.load(lse_ptr + batch * slb + tok_m * sls + head, mask=mask_m, other=0.0)
        q, do = q.to(MMA_DTYPE), do.to(MMA_DTYPE)

        k_rows = k_ptr + batch * skb + k_start * sks + kv_head * skh
        v_rows = v_ptr + batch * svb + k_start * svs + kv_head * svh
        offset = k_len - q_len
        if CAUSAL:
            end = tl.minimum(k_len, (m_block + 1) * BLOCK_M + offset)
            full = tl.maximum(0, tl.minimum(k_len, m_block * BLOCK_M + offset + 1)) // BLOCK_N * BLOCK_N
        else:
            end = k_len
            full = k_len // BLOCK_N * BLOCK_N
        dq = tl.zeros([BLOCK_M, DIM], tl.float32)
        dq = _dq_inner(dq, q, do, lse, delta, k_rows, v_rows, sks, svs, rows_m, 0, full, k_len, offset, qk_scale,
                       DIM, HEAD_DIM, BLOCK_N, False, CAUSAL, MMA_DTYPE, DOT_PRECISION)
        dq = _dq_inner(dq, q, do, lse, delta, k_rows, v_rows, sks, svs, rows_m, full, end, k_len, offset, qk_scale,
                       DIM, HEAD_DIM, BLOCK_N, True, CAUSAL, MMA_DTYPE, DOT_PRECISION)
        dq *= sm_scale
        if ROTATE:  # the epilogue: cos/sin computed here, nothing kept live across the loop
            pos = tl.load(pos_ptr + batch * spb + tok_m * sps, mask=mask_m, other=0)
            dq = _turn_back(dq, pos, inv_freq_ptr, scaling, DIM, ROTARY_DIM, INTERLEAVED, EXACT, FAST, SCALED)
        _store_rows(dq_ptr + batch * sdqb + tok_m[:, None] * sdqs + head * sdqh, mask_m, dq, DIM, HEAD_DIM)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_rows, do_rows, lse_ptrs, delta_ptrs, sqs, sdos, sls, rows_n, lo, full, q_len, offset,
                qk_scale, DIM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
                MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dK, dV (w.r.t. the rotated k, unscaled) accumulated over the Q blocks from lo on of one q head; the blocks
    below `full` cross the causal diagonal and are masked. Rows past the queries' end load as zeros (lse, delta 0),
    which adds exactly nothing, so only the diagonal needs a mask. One loop with a uniform branch for the mask
    (two loops, as in the forward, cost this kernel register spills inside its GQA loop)."""
    dtype = q_rows.dtype.element_ty
    for m0 in range(lo, q_len, BLOCK_M):
        rows_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = rows_m < q_len
        q = _load_rows(q_rows + rows_m[:, None].to(tl.int64) * sqs, mask_m, DIM, HEAD_DIM, True).to(MMA_DTYPE)
        do = _load_rows(do_rows + rows_m[:, None].to(tl.int64) * sdos, mask_m, DIM, HEAD_DIM, True).to(MMA_DTYPE)
        lse = tl.load(lse_ptrs + rows_m.to(tl.int64) * sls, mask=mask_m, other=0.0)
        delta = tl.load(delta_ptrs + rows_m.to(tl.int64) * sls, mask=mask_m, other=0.0)
        # transposed scores [BLOCK_N, BLOCK_M]: the K block is the row side here
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse[None, :])
        if CAUSAL:
            if m0 < full:
                p_t = tl.where(rows_n[:, None] <= rows_m[None, :] + offset, p_t, 0.0)
        dv += tl.dot(_mma(p_t, dtype, MMA_DTYPE), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = _mma(p_t * (dp_t - delta[None, :]), dtype, MMA_DTYPE)
        dk += tl.dot(ds_t, q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr, cu_q_ptr, cu_k_ptr, qk_scale,
                     sm_scale, sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh, sdkb, sdks, sdkh,
                     sdvb, sdvs, sdvh, slb, sls, seqlen_q, seqlen_k, n_seqs, group,
                     HEAD_DIM: tl.constexpr, DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, VARLEN: tl.constexpr, LEFTPAD: tl.constexpr, MMA_DTYPE: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """dK (w.r.t. the rotated k) and dV of one K/V block of one kv head, summed over the q heads of its GQA group;
    q and k come in rotated, so this is the plain FlashAttention-2 dK/dV kernel."""
    kv_head = tl.program_id(1).to(tl.int64)
    seq, n_block = _tile(cu_k_ptr, n_seqs, BLOCK_N, VARLEN)
    q_start, q_len = _bounds(cu_q_ptr, seq, seqlen_q, VARLEN, False)
    k_start, k_len = _bounds(cu_k_ptr, seq, seqlen_k, VARLEN, LEFTPAD)
    if n_block * BLOCK_N < k_len:
        batch = 0 if VARLEN else seq.to(tl.int64)
        rows_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rows_n < k_len
        tok_n = k_start + rows_n
        k = _load_rows(k_ptr + batch * skb + tok_n[:, None] * sks + kv_head * skh, mask_n, DIM, HEAD_DIM, True)
        v = _load_rows(v_ptr + batch * svb + tok_n[:, None] * svs + kv_head * svh, mask_n, DIM, HEAD_DIM, True)
        k, v = k.to(MMA_DTYPE), v.to(MMA_DTYPE)

        offset = k_len - q_len
        if CAUSAL:  # queries i >= j - offset see key j; from row n0 + BLOCK_N - 1 - offset on they see the block
            lo = tl.maximum(0, n_block * BLOCK_N - offset) // BLOCK_M * BLOCK_M
            full = n_block * BLOCK_N + BLOCK_N - 1 - offset
        else:
            lo = 0
            full = 0
        dk = tl.zeros([BLOCK_N, DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, DIM], tl.float32)
        for g in range(0, group):
            head = kv_head * group + g
            q_rows = q_ptr + batch * sqb + q_start * sqs + head * sqh
            do_rows = do_ptr + batch * sdob + q_start * sdos + head * sdoh
            lse_ptrs = lse_ptr + batch * slb + q_start * sls + head
            delta_ptrs = delta_ptr + batch * slb + q_start * sls + head
            dk, dv = _dkdv_inner(dk, dv, k, v, q_rows, do_rows, lse_ptrs, delta_ptrs, sqs, sdos, sls, rows_n, lo,
                                 full, q_len, offset, qk_scale, DIM, HEAD_DIM, BLOCK_M, CAUSAL, MMA_DTYPE,
                                 DOT_PRECISION)
        _store_rows(dk_ptr + batch * sdkb + tok_n[:, None] * sdks + kv_head * sdkh, mask_n, dk * sm_scale, DIM,
                    HEAD_DIM)
        _store_rows(dv_ptr + batch * sdvb + tok_n[:, None] * sdvs + kv_head * sdvh, mask_n, dv, DIM, HEAD_DIM)


# ------------------------------------------------------------------------------------------------- launchers
def _tile_constants(q, cu_seqlens_q, k_leftpad) -> dict:
    """Compile-time constants of the tiles, shared by the three kernels."""
    head_dim = q.shape[-1]
    # Triton's CPU interpreter computes bf16 dots wrongly: there the bf16-rounded operands are held in fp32, which is
    # the same arithmetic (bf16 x bf16 products are exact in fp32, accumulation is fp32 either way).
    mma_in_fp32 = q.dtype == torch.float32 or (q.device.type == "cpu" and q.dtype == torch.bfloat16)
    return dict(HEAD_DIM=head_dim, DIM=max(16, triton.next_power_of_2(head_dim)), VARLEN=cu_seqlens_q is not None,
                LEFTPAD=k_leftpad is not None, MMA_DTYPE=tl.float32 if mma_in_fp32 else _TL_DTYPES[q.dtype],
                # fp32 operands must not silently drop to tf32 on tensor cores; fp16/bf16 take the default
                DOT_PRECISION="ieee" if mma_in_fp32 else None)


def _gathered(q, inv_freq, interleaved: bool) -> bool:
    """Whether the rotation needs `_turn`'s gather (pairs and columns do not line up: see `_turn`)."""
    return not interleaved and 2 * inv_freq.numel() != max(16, triton.next_power_of_2(q.shape[-1]))


def _rope_constants(q, inv_freq, scaling: float, interleaved: bool, exact: bool, rotate: bool) -> dict:
    """Compile-time constants of the rotation (forward prologue, dQ epilogue)."""
    return dict(ROTARY_DIM=2 * inv_freq.numel(), INTERLEAVED=interleaved, EXACT=exact, ROTATE=rotate,
                SCALED=scaling != 1.0,
                FAST=q.device.type != "cpu")  # hardware cos/sin: compiled GPU code only (the interpreter has no PTX)


def _key_bounds(positions, cu_seqlens_k, k_leftpad):
    """The keys' bounds pointer (`_bounds`): cu_seqlens_k, k_leftpad, or a dummy (positions) when neither."""
    return cu_seqlens_k if cu_seqlens_k is not None else k_leftpad if k_leftpad is not None else positions


def _n_seqs(cu_seqlens) -> int:
    return 0 if cu_seqlens is None else cu_seqlens.numel() - 1


def _grid(x, cu_seqlens, heads: int, block: int) -> tuple[int, int, int]:
    """Programs for the row blocks of x `[B, S, H, D]` (see `_tile`): sized from shapes only, no host sync."""
    if cu_seqlens is None:
        return triton.cdiv(x.shape[1], block), heads, x.shape[0]
    return triton.cdiv(x.shape[1], block) + _n_seqs(cu_seqlens), heads, 1


def attention_forward(q, k, v, out, lse, positions, inv_freq, cu_seqlens_q, cu_seqlens_k, scaling: float,
                      softmax_scale: float, causal: bool, interleaved: bool, exact: bool, rotate: bool = True,
                      k_leftpad: torch.Tensor | None = None) -> None:
    """Fused forward into out `[B,Sq,Hq,D]` (q's dtype) and lse `[B,Sq,Hq]` (fp32, base-2 log-sum-exp of the scaled
    scores). q `[B,Sq,Hq,D]` unrotated, k (rotated) / v `[B,Sk,Hk,D]`, positions `[B,Sq]` (the queries'), inv_freq
    fp32 `[rotary_dim/2]`; packed: B == 1 and cu_seqlens_q / cu_seqlens_k int32 `[N+1]` (both or neither); or
    batched with int32 `k_leftpad` `[B]`: row b's keys are slots k_leftpad[b] ... Sk-1 (queries left of them see
    no key: output 0, lse -inf)."""
    config = triton_configs.attention_config("fwd", q.shape[-1], q.dtype, triton_configs.capability(q.device),
                                             rotate and _gathered(q, inv_freq, interleaved))
    grid = _grid(q, cu_seqlens_q, q.shape[2], config.block_m)
    if grid[0] * grid[2] == 0:
        return
    cu_q = positions if cu_seqlens_q is None else cu_seqlens_q  # a dummy pointer when not packed
    cu_k = _key_bounds(positions, cu_seqlens_k, k_leftpad)
    with triton_configs.device_guard(q):
        _fwd_kernel[grid](q, k, v, out, lse, positions, inv_freq, cu_q, cu_k, float(scaling),
                          float(softmax_scale) * LOG2E,
                          *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lse.stride()[:2],
                          *positions.stride(), q.shape[1], k.shape[1], _n_seqs(cu_seqlens_q), q.shape[2] // k.shape[2],
                          BLOCK_M=config.block_m, BLOCK_N=config.block_n, CAUSAL=causal, num_warps=config.num_warps,
                          num_stages=config.num_stages, **_tile_constants(q, cu_seqlens_q, k_leftpad),
                          **_rope_constants(q, inv_freq, scaling, interleaved, exact, rotate))


def attention_backward(grad_out, q_rot, k, v, out, lse, dq, dk, dv, positions, inv_freq, cu_seqlens_q, cu_seqlens_k,
                       scaling: float, softmax_scale: float, causal: bool, interleaved: bool, exact: bool,
                       rotate: bool = True, k_leftpad: torch.Tensor | None = None) -> None:
    """Fused backward into dq (w.r.t. the unrotated q when `rotate`: rotated back in the dQ kernel's epilogue), dk
    (w.r.t. the rotated k) and dv. q_rot: q rotated by the RoPE op (q itself without `rotate`); the rest as
    `attention_forward` (with `k_leftpad`, dk and dv are 0 at the padding slots)."""
    n_q_heads, n_kv_heads = q_rot.shape[2], k.shape[2]
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    delta = torch.empty_like(lse)  # rowsum(dO * O), written by the dQ kernel, read by the dK/dV kernel
    if k_leftpad is not None:  # the dK/dV kernel writes only the keys it attends to: padding slots get 0 here
        dk.zero_()
        dv.zero_()
    capability = triton_configs.capability(q_rot.device)
    cu_q = positions if cu_seqlens_q is None else cu_seqlens_q
    cu_k = _key_bounds(positions, cu_seqlens_k, k_leftpad)
    tiles = _tile_constants(q_rot, cu_seqlens_q, k_leftpad)
    qk_scale = float(softmax_scale) * LOG2E
    lengths = (q_rot.shape[1], k.shape[1], _n_seqs(cu_seqlens_q), n_q_heads // n_kv_heads)
    dq_config = triton_configs.attention_config("dq", q_rot.shape[-1], q_rot.dtype, capability,
                                                rotate and _gathered(q_rot, inv_freq, interleaved))
    dkdv_config = triton_configs.attention_config("dkdv", q_rot.shape[-1], q_rot.dtype, capability)
    dq_grid = _grid(q_rot, cu_seqlens_q, n_q_heads, dq_config.block_m)
    dkdv_grid = _grid(k, cu_seqlens_k, n_kv_heads, dkdv_config.block_n)
    with triton_configs.device_guard(q_rot):
        if dq_grid[0] * dq_grid[2]:
            _bwd_dq_kernel[dq_grid](
                q_rot, k, v, grad_out, out, dq, lse, delta, positions, inv_freq, cu_q, cu_k, float(scaling),
                qk_scale, float(softmax_scale), *q_rot.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                *grad_out.stride()[:3], *out.stride()[:3], *dq.stride()[:3], *lse.stride()[:2], *positions.stride(),
                *lengths, BLOCK_M=dq_config.block_m, BLOCK_N=dq_config.block_n, CAUSAL=causal,
                num_warps=dq_config.num_warps, num_stages=dq_config.num_stages, **tiles,
                **_rope_constants(q_rot, inv_freq, scaling, interleaved, exact, rotate))
        if dkdv_grid[0] * dkdv_grid[2]:
            _bwd_dkdv_kernel[dkdv_grid](
                q_rot, k, v, grad_out, dk, dv, lse, delta, cu_q, cu_k, qk_scale, float(softmax_scale),
                *q_rot.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *dk.stride()[:3],
                *dv.stride()[:3], *lse.stride()[:2], *lengths, BLOCK_M=dkdv_config.block_m,
                BLOCK_N=dkdv_config.block_n, CAUSAL=causal, num_warps=dkdv_config.num_warps,
                num_stages=dkdv_config.num_stages, **tiles)
