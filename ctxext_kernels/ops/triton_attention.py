"""Fused RoPE + FlashAttention-2 in Triton, forward and backward: q and k are rotated in registers, never stored.

Each Q or K tile is loaded as its two halves of rotation pairs, `x1 = x[:, first]` and `x2 = x[:, second]` (columns
i and i + D/2 in the half-split layout, 2i and 2i+1 interleaved), rotated in fp32 with the exact angle of its token's
position (`triton_math.rope_cos_sin`, the same math as the RoPE op), and rounded to the input dtype, exactly what a
separate RoPE pass would have written. Scores are then the split dot `q1 k1^T + q2 k2^T`, so no column shuffle is
ever needed. The backward pass recomputes the rotation, accumulates dQ_rot / dK_rot as halves, and rotates them back
by the negative angle before the single store.

Tensors are canonical views: q, out `[B, S, Hq, D]`, k, v `[B, S, Hk, D]` with any strides and a contiguous last dim;
positions `[B, S]`; for packed batches B == 1 and `cu_seqlens` `[num_seqs + 1]` delimits the sequences. Causal masking
follows token order inside each sequence, not position ids (PoSE ids jump). The log-sum-exp (base 2) and the softmax
correction term live in fp32 `[B, S, Hq]`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_math import rope_cos_sin, rotate_pair

LOG2E = 1.4426950408889634
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _seq_bounds(cu_seqlens_ptr, program_batch, seqlen, VARLEN: tl.constexpr):
    """(tensor batch index as int64, for offsets; first token; length) of the sequence a program works on."""
    if VARLEN:
        start = tl.load(cu_seqlens_ptr + program_batch)
        return (program_batch * 0).to(tl.int64), start, tl.load(cu_seqlens_ptr + program_batch + 1) - start
    return program_batch.to(tl.int64), 0, seqlen


@triton.jit
def _cos_sin(pos_ptr, pos_row, rows, row_mask, inv_freq, rotary, scaling, EXACT: tl.constexpr, ROTATE: tl.constexpr):
    """cos, sin `[BLOCK, PAIRS]` of the tokens `rows`; identity for the pass-through pairs (`rotary` False: dims past
    rotary_dim, unscaled) and everywhere when ROTATE is off (the no-RoPE baseline)."""
    pos = tl.load(pos_ptr + pos_row + rows, mask=row_mask, other=0)
    cos, sin = rope_cos_sin(pos[:, None], inv_freq[None, :], scaling, EXACT, False)
    cos = tl.where(rotary[None, :], cos, 1.0)
    sin = tl.where(rotary[None, :], sin, 0.0)
    if not ROTATE:
        cos, sin = tl.full(cos.shape, 1.0, tl.float32), tl.zeros(sin.shape, tl.float32)
    return cos, sin


@triton.jit
def _load_rotated(row_ptrs, mask, first, second, cos, sin):
    """The rotated halves (fp32) of a `[BLOCK, D]` tile whose row pointers are `row_ptrs` `[BLOCK, 1]`."""
    x1 = tl.load(row_ptrs + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row_ptrs + second, mask=mask, other=0.0).to(tl.float32)
    return rotate_pair(x1, x2, cos, sin)


@triton.jit
def _store_unrotated(row_ptrs, mask, first, second, g1, g2, cos, sin):
    """Store gradient halves g1, g2 taken w.r.t. the rotated tile as gradients of the unrotated one (angle negated)."""
    d1, d2 = rotate_pair(g1, g2, cos, -sin)
    tl.store(row_ptrs + first, d1.to(row_ptrs.dtype.element_ty), mask=mask)
    tl.store(row_ptrs + second, d2.to(row_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _mma(x, dtype, MMA_DTYPE: tl.constexpr):
    """A dot operand: rounded to the input dtype (what a separate pass would have stored), then held as MMA_DTYPE."""
    return x.to(dtype).to(MMA_DTYPE)


@triton.jit
def _rotated_rows(x_ptr, batch_offset, token_stride, head_offset, rows, start, length, pos_ptr, pos_batch_offset,
                  pos_stride, first, second, pair_mask, inv_freq, rotary, scaling, EXACT: tl.constexpr,
                  ROTATE: tl.constexpr, MMA_DTYPE: tl.constexpr):
    """Rows `rows` `[BLOCK]` of one head of q or k, rotated by their positions.

    Returns the rotated halves as dot operands `[BLOCK, PAIRS]`, the rows' (cos, sin) (the backward rotates its
    gradients back with them), the row mask and the token indices (int64, for offsets)."""
    mask = rows < length
    tokens = (start + rows).to(tl.int64)
    cos, sin = _cos_sin(pos_ptr, pos_batch_offset, (start + rows) * pos_stride, mask, inv_freq, rotary, scaling,
                        EXACT, ROTATE)
    x1, x2 = _load_rotated(x_ptr + batch_offset + tokens[:, None] * token_stride + head_offset,
                           mask[:, None] & pair_mask, first, second, cos, sin)
    dtype = x_ptr.dtype.element_ty
    return _mma(x1, dtype, MMA_DTYPE), _mma(x2, dtype, MMA_DTYPE), cos, sin, mask, tokens


@triton.jit
def _split_dot(a1, a2, b1, b2, DOT_PRECISION: tl.constexpr):
    """a @ b^T for tiles held as their two halves of rotation pairs: a1 b1^T + a2 b2^T."""
    return (tl.dot(a1, tl.trans(b1), input_precision=DOT_PRECISION)
            + tl.dot(a2, tl.trans(b2), input_precision=DOT_PRECISION))


@triton.jit
def _pair_columns(PAIRS: tl.constexpr, HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Columns (first, second) `[1, PAIRS]` of every pair, which pairs exist (PAIRS is D/2 rounded up to a power of
    two), and which rotate. With partial rotary the dims past ROTARY_DIM are paired up too, half-split within the
    tail, and pass through with the identity rotation: the split dot then still covers every column exactly once."""
    pair = tl.arange(0, PAIRS)
    rotary = pair < ROTARY_DIM // 2
    if INTERLEAVED:
        first, second = 2 * pair, 2 * pair + 1
    else:
        tail = pair - ROTARY_DIM // 2
        first = tl.where(rotary, pair, ROTARY_DIM + tail)
        second = tl.where(rotary, pair + ROTARY_DIM // 2, ROTARY_DIM + (HEAD_DIM - ROTARY_DIM) // 2 + tail)
    return first[None, :], second[None, :], pair < HEAD_DIM // 2, rotary


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, pos_ptr, inv_freq_ptr, cu_seqlens_ptr, scaling, qk_scale,
                sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh, slb, sls, spb, sps,
                seqlen, n_q_heads, group,
                HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, PAIRS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, VARLEN: tl.constexpr, INTERLEAVED: tl.constexpr, EXACT: tl.constexpr,
                ROTATE: tl.constexpr, MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    bh, m_block = tl.program_id(0), tl.program_id(1)
    head = bh % n_q_heads
    batch, start, length = _seq_bounds(cu_seqlens_ptr, bh // n_q_heads, seqlen, VARLEN)
    if m_block * BLOCK_M < length:
        first, second, pair_mask, rotary = _pair_columns(PAIRS, HEAD_DIM, ROTARY_DIM, INTERLEAVED)
        inv_freq = tl.load(inv_freq_ptr + tl.arange(0, PAIRS), mask=rotary, other=0.0)
        dim = tl.arange(0, HEAD_DIM)[None, :]
        kv_head = (head // group).to(tl.int64)

        dtype = q_ptr.dtype.element_ty
        rows_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        q1, q2, cos_m, sin_m, mask_m, tok_m = _rotated_rows(
            q_ptr, batch * sqb, sqs, head * sqh, rows_m, start, length, pos_ptr, batch * spb, sps, first, second,
            pair_mask, inv_freq, rotary, scaling, EXACT, ROTATE, MMA_DTYPE)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        end = tl.minimum(length, (m_block + 1) * BLOCK_M) if CAUSAL else length
        for n0 in range(0, end, BLOCK_N):
            rows_n = n0 + tl.arange(0, BLOCK_N)
            k1, k2, cos_n, sin_n, mask_n, tok_n = _rotated_rows(
                k_ptr, batch * skb, sks, kv_head * skh, rows_n, start, length, pos_ptr, batch * spb, sps, first,
                second, pair_mask, inv_freq, rotary, scaling, EXACT, ROTATE, MMA_DTYPE)
            scores = _split_dot(q1, q2, k1, k2, DOT_PRECISION)
            keep = mask_n[None, :]
            if CAUSAL:
                keep = keep & (rows_m[:, None] >= rows_n[None, :])
            scores = tl.where(keep, scores * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past the sequence end see only -inf
            p = tl.exp2(scores - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + batch * svb + tok_n[:, None] * svs + kv_head * svh + dim, mask=mask_n[:, None],
                        other=0.0).to(MMA_DTYPE)
            acc = acc * alpha[:, None] + tl.dot(_mma(p, dtype, MMA_DTYPE), v, input_precision=DOT_PRECISION)
            m_i = m_new
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out_rows = out_ptr + batch * sob + tok_m[:, None] * sos + head * soh
        tl.store(out_rows + dim, (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=mask_m[:, None])
        tl.store(lse_ptr + batch * slb + tok_m * sls + head, m_i + tl.log2(l_safe), mask=mask_m)


@triton.jit
def _bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr, pos_ptr, inv_freq_ptr,
                     cu_seqlens_ptr, scaling, qk_scale, sm_scale,
                     sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh, sdkb, sdks, sdkh,
                     sdvb, sdvs, sdvh, slb, sls, spb, sps,
                     seqlen, n_kv_heads, group,
                     HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, PAIRS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, VARLEN: tl.constexpr, INTERLEAVED: tl.constexpr, EXACT: tl.constexpr,
                     ROTATE: tl.constexpr, MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dK and dV of one K/V block of one kv head, summed over the q heads of its GQA group."""
    bh, n_block = tl.program_id(0), tl.program_id(1)
    kv_head = (bh % n_kv_heads).to(tl.int64)
    batch, start, length = _seq_bounds(cu_seqlens_ptr, bh // n_kv_heads, seqlen, VARLEN)
    if n_block * BLOCK_N < length:
        first, second, pair_mask, rotary = _pair_columns(PAIRS, HEAD_DIM, ROTARY_DIM, INTERLEAVED)
        inv_freq = tl.load(inv_freq_ptr + tl.arange(0, PAIRS), mask=rotary, other=0.0)
        dim = tl.arange(0, HEAD_DIM)[None, :]
        dtype = k_ptr.dtype.element_ty

        rows_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        k1, k2, cos_n, sin_n, mask_n, tok_n = _rotated_rows(
            k_ptr, batch * skb, sks, kv_head * skh, rows_n, start, length, pos_ptr, batch * spb, sps, first, second,
            pair_mask, inv_freq, rotary, scaling, EXACT, ROTATE, MMA_DTYPE)
        v = tl.load(v_ptr + batch * svb + tok_n[:, None] * svs + kv_head * svh + dim, mask=mask_n[:, None],
                    other=0.0).to(MMA_DTYPE)

        dk1 = tl.zeros([BLOCK_N, PAIRS], tl.float32)
        dk2 = tl.zeros([BLOCK_N, PAIRS], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        m_start = (n_block * BLOCK_N) // BLOCK_M * BLOCK_M if CAUSAL else 0
        for g in range(0, group):
            head = kv_head * group + g
            for m0 in range(m_start, length, BLOCK_M):
                rows_m = m0 + tl.arange(0, BLOCK_M)
                q1, q2, cos_m, sin_m, mask_m, tok_m = _rotated_rows(
                    q_ptr, batch * sqb, sqs, head * sqh, rows_m, start, length, pos_ptr, batch * spb, sps, first,
                    second, pair_mask, inv_freq, rotary, scaling, EXACT, ROTATE, MMA_DTYPE)
                lse = tl.load(lse_ptr + batch * slb + tok_m * sls + head, mask=mask_m, other=0.0)
                delta = tl.load(delta_ptr + batch * slb + tok_m * sls + head, mask=mask_m, other=0.0)
                do = tl.load(do_ptr + batch * sdob + tok_m[:, None] * sdos + head * sdoh + dim, mask=mask_m[:, None],
                             other=0.0).to(MMA_DTYPE)
                # Transposed scores [BLOCK_N, BLOCK_M]: the K block is the row side here.
                scores_t = _split_dot(k1, k2, q1, q2, DOT_PRECISION)
                keep = mask_n[:, None] & mask_m[None, :]
                if CAUSAL:
                    keep = keep & (rows_m[None, :] >= rows_n[:, None])
                p_t = tl.where(keep, tl.exp2(scores_t * qk_scale - lse[None, :]), 0.0)
                dv += tl.dot(_mma(p_t, dtype, MMA_DTYPE), do, input_precision=DOT_PRECISION)
                dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
                ds_t = _mma(p_t * (dp_t - delta[None, :]), dtype, MMA_DTYPE)
                dk1 += tl.dot(ds_t, q1, input_precision=DOT_PRECISION)
                dk2 += tl.dot(ds_t, q2, input_precision=DOT_PRECISION)
        dk_rows = dk_ptr + batch * sdkb + tok_n[:, None] * sdks + kv_head * sdkh
        _store_unrotated(dk_rows, mask_n[:, None] & pair_mask, first, second, dk1 * sm_scale, dk2 * sm_scale, cos_n,
                         sin_n)
        tl.store(dv_ptr + batch * sdvb + tok_n[:, None] * sdvs + kv_head * sdvh + dim, dv.to(dv_ptr.dtype.element_ty),
                 mask=mask_n[:, None])


@triton.jit
def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr, pos_ptr, inv_freq_ptr, cu_seqlens_ptr,
                   scaling, qk_scale, sm_scale,
                   sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh, sdqb, sdqs, sdqh, slb, sls, spb, sps,
                   seqlen, n_q_heads, group,
                   HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, PAIRS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, VARLEN: tl.constexpr, INTERLEAVED: tl.constexpr, EXACT: tl.constexpr,
                   ROTATE: tl.constexpr, MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dQ of one Q block of one q head (a separate pass, so no atomics are needed for dK/dV)."""
    bh, m_block = tl.program_id(0), tl.program_id(1)
    head = bh % n_q_heads
    batch, start, length = _seq_bounds(cu_seqlens_ptr, bh // n_q_heads, seqlen, VARLEN)
    if m_block * BLOCK_M < length:
        first, second, pair_mask, rotary = _pair_columns(PAIRS, HEAD_DIM, ROTARY_DIM, INTERLEAVED)
        inv_freq = tl.load(inv_freq_ptr + tl.arange(0, PAIRS), mask=rotary, other=0.0)
        dim = tl.arange(0, HEAD_DIM)[None, :]
        kv_head = (head // group).to(tl.int64)
        dtype = q_ptr.dtype.element_ty

        rows_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        q1, q2, cos_m, sin_m, mask_m, tok_m = _rotated_rows(
            q_ptr, batch * sqb, sqs, head * sqh, rows_m, start, length, pos_ptr, batch * spb, sps, first, second,
            pair_mask, inv_freq, rotary, scaling, EXACT, ROTATE, MMA_DTYPE)
        lse = tl.load(lse_ptr + batch * slb + tok_m * sls + head, mask=mask_m, other=0.0)
        delta = tl.load(delta_ptr + batch * slb + tok_m * sls + head, mask=mask_m, other=0.0)
        do = tl.load(do_ptr + batch * sdob + tok_m[:, None] * sdos + head * sdoh + dim, mask=mask_m[:, None],
                     other=0.0).to(MMA_DTYPE)

        dq1 = tl.zeros([BLOCK_M, PAIRS], tl.float32)
        dq2 = tl.zeros([BLOCK_M, PAIRS], tl.float32)
        end = tl.minimum(length, (m_block + 1) * BLOCK_M) if CAUSAL else length
        for n0 in range(0, end, BLOCK_N):
            rows_n = n0 + tl.arange(0, BLOCK_N)
            k1, k2, cos_n, sin_n, mask_n, tok_n = _rotated_rows(
                k_ptr, batch * skb, sks, kv_head * skh, rows_n, start, length, pos_ptr, batch * spb, sps, first,
                second, pair_mask, inv_freq, rotary, scaling, EXACT, ROTATE, MMA_DTYPE)
            v = tl.load(v_ptr + batch * svb + tok_n[:, None] * svs + kv_head * svh + dim, mask=mask_n[:, None],
                        other=0.0).to(MMA_DTYPE)
            scores = _split_dot(q1, q2, k1, k2, DOT_PRECISION)
            keep = mask_m[:, None] & mask_n[None, :]
            if CAUSAL:
                keep = keep & (rows_m[:, None] >= rows_n[None, :])
            p = tl.where(keep, tl.exp2(scores * qk_scale - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = _mma(p * (dp - delta[:, None]), dtype, MMA_DTYPE)
            dq1 += tl.dot(ds, k1, input_precision=DOT_PRECISION)
            dq2 += tl.dot(ds, k2, input_precision=DOT_PRECISION)
        dq_rows = dq_ptr + batch * sdqb + tok_m[:, None] * sdqs + head * sdqh
        _store_unrotated(dq_rows, mask_m[:, None] & pair_mask, first, second, dq1 * sm_scale, dq2 * sm_scale, cos_m,
                         sin_m)


def _common(q, inv_freq, cu_seqlens, rotate: bool, block_m: int, block_n: int):
    """Compile-time flags and scalars shared by the three kernels."""
    head_dim = q.shape[-1]
    # Triton's CPU interpreter computes bf16 dots wrongly: there the bf16-rounded operands are held in fp32, which is
    # the same arithmetic (bf16 x bf16 products are exact in fp32, accumulation is fp32 either way).
    mma_in_fp32 = q.dtype == torch.float32 or (q.device.type == "cpu" and q.dtype == torch.bfloat16)
    return dict(HEAD_DIM=head_dim, ROTARY_DIM=2 * inv_freq.numel(), PAIRS=triton.next_power_of_2(head_dim // 2),
                BLOCK_M=block_m, BLOCK_N=block_n,
                VARLEN=cu_seqlens is not None, ROTATE=rotate,
                MMA_DTYPE=tl.float32 if mma_in_fp32 else _TL_DTYPES[q.dtype],
                # fp32 operands must not silently drop to tf32 on tensor cores; fp16/bf16 take the default
                DOT_PRECISION="ieee" if mma_in_fp32 else None)


def _blocks(q) -> tuple[int, int]:
    # 64x64 tiles: one Q tile, one K tile and one V tile of head_dim 128 in bf16 are 48 KB of shared memory, leaving
    # room for two pipeline stages on Ampere/Hopper; the interpreter (CPU) gets small tiles to stay fast.
    return (16, 16) if q.device.type == "cpu" else (64, 64)


def _grid_batches(q, cu_seqlens) -> tuple[int, int]:
    """(number of sequences, longest sequence) to size the grid."""
    if cu_seqlens is None:
        return q.shape[0], q.shape[1]
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return lengths.numel(), int(lengths.max()) if lengths.numel() else 0


def attention_forward(q, k, v, out, lse, positions, inv_freq, cu_seqlens, scaling: float, softmax_scale: float,
                      causal: bool, interleaved: bool, exact: bool, rotate: bool = True) -> None:
    """Fused forward into out `[B,S,Hq,D]` (q's dtype) and lse `[B,S,Hq]` (fp32, base-2 log-sum-exp of the scaled
    scores). q `[B,S,Hq,D]`, k/v `[B,S,Hk,D]`, positions `[B,S]`, inv_freq fp32 `[rotary_dim/2]`."""
    batch, seqlen, n_q_heads, head_dim = q.shape
    block_m, block_n = _blocks(q)
    n_seqs, longest = _grid_batches(q, cu_seqlens)
    # (sequence, head) on grid axis 0 (2^31 - 1 programs), row blocks on axis 1 (65535)
    grid = (n_seqs * n_q_heads, triton.cdiv(longest, block_m))
    _fwd_kernel[grid](q, k, v, out, lse, positions, inv_freq, cu_seqlens if cu_seqlens is not None else positions,
                      float(scaling), float(softmax_scale) * LOG2E,
                      *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lse.stride()[:2],
                      *positions.stride(), seqlen, n_q_heads, n_q_heads // k.shape[2],
                      CAUSAL=causal, INTERLEAVED=interleaved, EXACT=exact,
                      **_common(q, inv_freq, cu_seqlens, rotate, block_m, block_n))


def attention_backward(grad_out, q, k, v, out, lse, dq, dk, dv, positions, inv_freq, cu_seqlens, scaling: float,
                       softmax_scale: float, causal: bool, interleaved: bool, exact: bool, rotate: bool = True) -> None:
    """Fused backward into dq, dk, dv: gradients of the *unrotated* q, k and of v (canonical views)."""
    batch, seqlen, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    # D_i = rowsum(dO * O): the softmax-Jacobian correction, one fp32 value per query row.
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    block_m, block_n = _blocks(q)
    n_seqs, longest = _grid_batches(q, cu_seqlens)
    common = _common(q, inv_freq, cu_seqlens, rotate, block_m, block_n)
    cu = cu_seqlens if cu_seqlens is not None else positions
    scalars = (float(scaling), float(softmax_scale) * LOG2E, float(softmax_scale))
    _bwd_dkdv_kernel[(n_seqs * n_kv_heads, triton.cdiv(longest, block_n))](
        q, k, v, grad_out, dk, dv, lse, delta, positions, inv_freq, cu, *scalars,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *dk.stride()[:3],
        *dv.stride()[:3], *lse.stride()[:2], *positions.stride(), seqlen, n_kv_heads, n_q_heads // n_kv_heads,
        CAUSAL=causal, INTERLEAVED=interleaved, EXACT=exact, **common)
    _bwd_dq_kernel[(n_seqs * n_q_heads, triton.cdiv(longest, block_m))](
        q, k, v, grad_out, dq, lse, delta, positions, inv_freq, cu, *scalars,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *dq.stride()[:3],
        *lse.stride()[:2], *positions.stride(), seqlen, n_q_heads, n_q_heads // n_kv_heads,
        CAUSAL=causal, INTERLEAVED=interleaved, EXACT=exact, **common)
