"""`rope_attention`: RoPE applied inside the attention prologue, as one autograd-aware custom op.

q and k arrive *unrotated*; the fused kernels rotate each tile in registers from the integer positions (the exact
angle of the RoPE op) and run FlashAttention-2. The "torch" backend is the reference: rotate with the RoPE op's
reference, then attention in fp32 with an explicit mask. Checks and layout handling are the RoPE op's own.
"""

from __future__ import annotations

import math

import torch

from . import cuda_ext, reference
from .rope import _canonical, _check_qk, _check_range, _positions_2d, _triton_status
from .spec import RopeSpec

ATTENTION_BACKENDS = ("cuda", "triton", "torch")
_LOG2E = 1.4426950408889634
_DTYPE_TAGS = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _cuda_status(device_type: str) -> tuple[bool, str]:
    cuda_ok, _, reason = cuda_ext.status()
    if not cuda_ok:
        return False, reason
    if not hasattr(cuda_ext._load()[0], "rope_attention_forward_cuda"):
        return False, "the CUDA extension was built without csrc/attention (fused attention)"
    if device_type != "cuda":
        return False, "the CUDA fused attention needs CUDA tensors"
    return True, ("hand-written CUDA FlashAttention-2 (mma.sync, ldmatrix, cp.async; sm_80+), float16/bfloat16, "
                  "head_dim 64/128; opt-in: not yet run against the float64 oracle on a GPU")


def attention_backends(device: str | torch.device | None = None) -> dict[str, tuple[bool, str]]:
    """`{name: (usable, reason)}` of the fused-attention backends on `device` (default: CUDA if available)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    return {
        "cuda": _cuda_status(device_type),
        "triton": _triton_status(device_type),
        "torch": (True, "reference: RoPE then fp32 attention with an explicit mask, O(S^2) memory"),
    }


@torch.compiler.assume_constant_result  # host configuration, baked into compiled graphs
def _pick(backend: str | None, device_type: str) -> str:
    available = attention_backends(device_type)
    if backend is None:
        # Triton is the default on GPUs; the CUDA kernels stay opt-in until a GPU has run them against the oracle.
        return "triton" if device_type == "cuda" and available["triton"][0] else "torch"
    if backend not in available:
        raise ValueError(f"backend must be one of {tuple(available)} or None, got {backend!r}")
    if not available[backend][0]:
        raise RuntimeError(f"backend {backend!r} is not usable for {device_type} tensors: {available[backend][1]}")
    return backend


# --------------------------------------------------------------------------------------------- torch reference
def _segments(q_canonical: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Sequence index of every token `[S]` (all zeros without cu_seqlens)."""
    seqlen = q_canonical.shape[1]
    tokens = torch.arange(seqlen, device=q_canonical.device)
    if cu_seqlens is None:
        return torch.zeros_like(tokens)
    return torch.searchsorted(cu_seqlens.to(tokens.device, torch.int64), tokens, right=True) - 1


def _reference_parts(q, k, v, positions, inv_freq, cu_seqlens, scaling, softmax_scale, causal, interleaved, exact):
    """fp32 pieces of the reference: rotated q `[B,S,Hq,D]`, rotated k and v repeated to Hq heads, the probabilities
    `[B,Hq,S,S]`, the base-e log-sum-exp `[B,Hq,S]` and cos/sin `[B,S,1,D/2]`."""
    cos, sin = reference.rope_angles_cos_sin(positions, inv_freq, scaling, exact=exact)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    group = q.shape[2] // k.shape[2]
    q_rot = reference.rotate(q, cos, sin, interleaved).float()
    k_rot = reference.rotate(k, cos, sin, interleaved).float().repeat_interleave(group, dim=2)
    v_rep = v.float().repeat_interleave(group, dim=2)
    scores = torch.einsum("bmhd,bnhd->bhmn", q_rot, k_rot) * softmax_scale
    segment = _segments(q, cu_seqlens)
    keep = segment[:, None] == segment[None, :]
    if causal:
        keep = keep & torch.ones_like(keep).tril()
    scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return q_rot, k_rot, v_rep, torch.softmax(scores, dim=-1), lse, cos, sin


def _reference_attention(q, k, v, positions, inv_freq, cu_seqlens, scaling, softmax_scale, causal, interleaved, exact):
    """Canonical `[B,S,H,D]` inputs -> (out in q's dtype, lse base 2 `[B,S,Hq]`)."""
    *_, v_rep, probs, lse, _, _ = _reference_parts(q, k, v, positions, inv_freq, cu_seqlens, scaling, softmax_scale,
                                                   causal, interleaved, exact)
    out = torch.einsum("bhmn,bnhd->bmhd", probs, v_rep)
    return out.to(q.dtype), (lse * _LOG2E).transpose(1, 2)


def _reference_attention_backward(grad_out, q, k, v, positions, inv_freq, cu_seqlens, scaling, softmax_scale, causal,
                                  interleaved, exact):
    """The attention backward written out (custom-op bodies run without autograd): canonical dq, dk, dv."""
    q_rot, k_rot, v_rep, probs, _, cos, sin = _reference_parts(q, k, v, positions, inv_freq, cu_seqlens, scaling,
                                                               softmax_scale, causal, interleaved, exact)
    grad_out = grad_out.float()
    out = torch.einsum("bhmn,bnhd->bmhd", probs, v_rep)
    grad_probs = torch.einsum("bmhd,bnhd->bhmn", grad_out, v_rep)
    correction = (grad_out * out).sum(-1).transpose(1, 2)[..., None]  # rowsum(dO * O) [B, H, S, 1]
    grad_scores = probs * (grad_probs - correction) * softmax_scale
    group = q.shape[2] // k.shape[2]

    def per_kv_head(x):  # [B, S, Hq, D] -> [B, S, Hk, D], summing each GQA group
        return x.unflatten(2, (k.shape[2], group)).sum(3)

    grad_q_rot = torch.einsum("bhmn,bnhd->bmhd", grad_scores, k_rot)
    grad_k_rot = per_kv_head(torch.einsum("bhmn,bmhd->bnhd", grad_scores, q_rot))
    grad_v = per_kv_head(torch.einsum("bhmn,bmhd->bnhd", probs, grad_out))
    # the rotation's transpose is the rotation by the negative angle
    return (reference.rotate(grad_q_rot, cos, -sin, interleaved).to(q.dtype),
            reference.rotate(grad_k_rot, cos, -sin, interleaved).to(k.dtype), grad_v.to(v.dtype))


# ------------------------------------------------------------------------------------------ fused launchers
def _longest(q_canonical: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    """Longest sequence: S, or the longest packed sequence of cu_seqlens (one host sync)."""
    if cu_seqlens is None:
        return q_canonical.shape[1]
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """x, or a dense copy when the CUDA kernels cannot stream its rows (contiguous, 16-byte aligned head rows)."""
    if x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(stride % 8 == 0 for stride in x.stride()[:3]):
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _cuda_args(q, k, v, out, lse, positions, inv_freq, cu_seqlens, cu_seqlens_k, scaling, softmax_scale, causal,
               interleaved, exact, rotate):
    """AttentionArgs of the CUDA launchers (canonical `[B, S, H, D]` views; see csrc/attention/attention.h)."""
    ext = cuda_ext._load()[0]
    args = ext.AttentionArgs()
    for name, x in (("q", q), ("k", k), ("v", v), ("out", out), ("lse", lse), ("positions", positions),
                    ("inv_freq", inv_freq), ("cu_seqlens", cu_seqlens), ("cu_seqlens_k", cu_seqlens_k)):
        setattr(args, name, cuda_ext._view(x, ext))
    args.dtype = getattr(ext.DType, _DTYPE_TAGS[q.dtype])
    args.positions_int64 = positions.dtype == torch.int64
    args.max_seqlen_q, args.max_seqlen_k = _longest(q, cu_seqlens), _longest(k, cu_seqlens_k)
    args.scaling, args.softmax_scale = float(scaling), float(softmax_scale)
    args.causal, args.interleaved, args.exact, args.rotate = causal, interleaved, exact, rotate
    args.device = q.device.index if q.device.index is not None else torch.cuda.current_device()
    args.stream = torch.cuda.current_stream(q.device).cuda_stream
    return ext, args


def _cuda_forward(q, k_rot, v, out, lse, positions, inv_freq, cu_seqlens, cu_seqlens_k, scaling, softmax_scale,
                  causal, interleaved, exact, rotate) -> None:
    """The CUDA forward into out `[B, Sq, Hq, D]` and lse fp32 `[B, Sq, Hq]`.

    q `[B, Sq, Hq, D]` goes in unrotated (the kernel rotates each Q tile by `positions` `[B, Sq]`), k_rot and v
    `[B, Sk, Hk, D]` with the keys already rotated, Sk >= Sq; causal masking is aligned bottom-right (query i sees
    keys j <= i + Sk - Sq). Packed batches (B == 1): int32 `cu_seqlens` / `cu_seqlens_k` `[N + 1]`, both or neither.
    """
    q, k_rot, v = _aligned(q), _aligned(k_rot), _aligned(v)  # named: the copies must outlive the launch
    ext, args = _cuda_args(q, k_rot, v, out, lse, positions, inv_freq, cu_seqlens, cu_seqlens_k, scaling,
                           softmax_scale, causal, interleaved, exact, rotate)
    ext.rope_attention_forward_cuda(args)


def _cuda_backward(grad_out, q_rot, k_rot, v, out, lse, dq, dk_rot, dv, positions, inv_freq, cu_seqlens,
                   cu_seqlens_k, scaling, softmax_scale, causal, interleaved, exact, rotate) -> None:
    """The CUDA backward into dq (of the unrotated q: the kernel rotates it back), dk_rot (of the rotated keys) and
    dv. Takes the queries rotated (q_rot; every dK/dV block reads each Q tile, so they are rotated once up front);
    otherwise the arguments of `_cuda_forward`.
    """
    grad_out, q_rot, k_rot, v = (_aligned(x) for x in (grad_out, q_rot, k_rot, v))
    ext, args = _cuda_args(q_rot, k_rot, v, out, lse, positions, inv_freq, cu_seqlens, cu_seqlens_k, scaling,
                           softmax_scale, causal, interleaved, exact, rotate)
    # D_i = rowsum(dO * O): the softmax-Jacobian correction, one fp32 value per query row
    delta = (grad_out.float() * out.float()).sum(-1)
    for name, x in (("grad_out", grad_out), ("delta", delta), ("grad_q", dq), ("grad_k", dk_rot), ("grad_v", dv)):
        setattr(args, name, cuda_ext._view(x, ext))
    ext.rope_attention_backward_cuda(args)


def _rope_cuda(x, positions, inv_freq, scaling, interleaved, exact, conjugate=False, out=None) -> torch.Tensor:
    """x `[B, S, H, D]` rotated by the CUDA RoPE kernel (conjugate: by the negative angle) into out (default: new)."""
    out = torch.empty_like(x) if out is None else out
    cuda_ext.rope_forward(x, None, out, None, positions, inv_freq, scaling, interleaved, conjugate, exact)
    return out


def fused_forward(backend, q, k, v, out, lse, positions, inv_freq, cu_seqlens, scaling, softmax_scale, causal,
                  interleaved, exact, rotate=True) -> None:
    """Run a fused backend's forward into out `[B,S,Hq,D]` and lse fp32 `[B,S,Hq]` (canonical views).

    `rotate=False` runs the same kernel without RoPE: the benchmark's measure of what the rotation costs.
    """
    if backend == "cuda":
        # The CUDA kernel takes rotated keys: k is rotated once here, with the RoPE kernel.
        k_rot = _rope_cuda(k, positions, inv_freq, scaling, interleaved, exact) if rotate else k
        _cuda_forward(q, k_rot, v, out, lse, positions, inv_freq, cu_seqlens, cu_seqlens, scaling, softmax_scale,
                      causal, interleaved, exact, rotate)
        return
    from . import triton_attention

    triton_attention.attention_forward(q, k, v, out, lse, positions, inv_freq, cu_seqlens, scaling, softmax_scale,
                                       causal, interleaved, exact, rotate)


def fused_backward(backend, grad_out, q, k, v, out, lse, dq, dk, dv, positions, inv_freq, cu_seqlens, scaling,
                   softmax_scale, causal, interleaved, exact, rotate=True) -> None:
    """Run a fused backend's backward into dq, dk, dv (gradients of the unrotated q, k and of v; canonical views)."""
    if backend == "cuda":
        if rotate:
            rope = dict(positions=positions, inv_freq=inv_freq, scaling=scaling, interleaved=interleaved, exact=exact)
            q_rot, k_rot, dk_rot = _rope_cuda(q, **rope), _rope_cuda(k, **rope), torch.empty_like(dk)
        else:
            q_rot, k_rot, dk_rot = q, k, dk
        _cuda_backward(grad_out, q_rot, k_rot, v, out, lse, dq, dk_rot, dv, positions, inv_freq, cu_seqlens,
                       cu_seqlens, scaling, softmax_scale, causal, interleaved, exact, rotate)
        if rotate:  # the gradient of the unrotated k: R^T, the rotation by the negative angle
            _rope_cuda(dk_rot, **rope, conjugate=True, out=dk)
        return
    from . import triton_attention

    triton_attention.attention_backward(grad_out, q, k, v, out, lse, dq, dk, dv, positions, inv_freq, cu_seqlens,
                                        scaling, softmax_scale, causal, interleaved, exact, rotate)


# ---------------------------------------------------------------------------------------------------- custom ops
def _lse_shape(q: torch.Tensor, layout: str) -> tuple[int, int, int]:
    b, s, h, _ = _canonical(q, layout).shape
    return b, s, h


@torch.library.custom_op("ctxext::rope_attention", mutates_args=())
def _rope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    inv_freq: torch.Tensor, cu_seqlens: torch.Tensor | None, scaling: float, softmax_scale: float,
                    causal: bool, layout: str, interleaved: bool, exact: bool, backend: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out in q's layout, lse fp32 `[B, S, Hq]` base 2); q, k unrotated."""
    qc, kc, vc = (_canonical(x, layout) for x in (q, k, v))
    if backend == "torch":
        out_c, lse = _reference_attention(qc, kc, vc, positions, inv_freq, cu_seqlens, scaling, softmax_scale,
                                          causal, interleaved, exact)
        out = torch.empty_like(q)
        _canonical(out, layout).copy_(out_c)
        return out, lse.contiguous()
    out, lse = torch.empty_like(q), q.new_empty(_lse_shape(q, layout), dtype=torch.float32)
    fused_forward(backend, qc, kc, vc, _canonical(out, layout), lse, positions, inv_freq, cu_seqlens, scaling,
                  softmax_scale, causal, interleaved, exact)
    return out, lse


@_rope_attention.register_fake
def _(q, k, v, positions, inv_freq, cu_seqlens, scaling, softmax_scale, causal, layout, interleaved, exact, backend):
    return torch.empty_like(q), q.new_empty(_lse_shape(q, layout), dtype=torch.float32)


@torch.library.custom_op("ctxext::rope_attention_backward", mutates_args=())
def _rope_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                             cu_seqlens: torch.Tensor | None, scaling: float, softmax_scale: float, causal: bool,
                             layout: str, interleaved: bool, exact: bool, backend: str
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the unrotated q and k and of v."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if backend == "torch":
        grads = _reference_attention_backward(*(_canonical(x, layout) for x in (grad_out, q, k, v)), positions,
                                              inv_freq, cu_seqlens, scaling, softmax_scale, causal, interleaved, exact)
        for dst, grad in zip((dq, dk, dv), grads):
            _canonical(dst, layout).copy_(grad)
        return dq, dk, dv
    fused_backward(backend, *(_canonical(x, layout) for x in (grad_out, q, k, v, out)), lse,
                   *(_canonical(x, layout) for x in (dq, dk, dv)), positions, inv_freq, cu_seqlens, scaling,
                   softmax_scale, causal, interleaved, exact)
    return dq, dk, dv


@_rope_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, positions, inv_freq, cu_seqlens, scaling, softmax_scale, causal, layout,
      interleaved, exact, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, positions, inv_freq, cu_seqlens, *flags = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, positions, inv_freq, cu_seqlens)
    ctx.flags = flags  # scaling, softmax_scale, causal, layout, interleaved, exact, backend


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, positions, inv_freq, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _rope_attention_backward(grad_out, q, k, v, out, lse, positions, inv_freq, cu_seqlens, *ctx.flags)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


_rope_attention.register_autograd(_backward, setup_context=_setup_context)


# -------------------------------------------------------------------------------------------------------- public
def rope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor | None,
                   spec: RopeSpec, *, causal: bool = True, softmax_scale: float | None = None, layout: str = "bhsd",
                   cu_seqlens: torch.Tensor | None = None, interleaved: bool = False, backend: str | None = None,
                   check_positions: bool = True) -> torch.Tensor:
    """Attention over q and k rotated by their positions inside the kernel (rotated q/k never reach memory).

    Args:
        q: unrotated queries `[B, Hq, S, D]` ("bhsd"), `[B, S, Hq, D]` ("bshd") or `[T, Hq, D]` ("thd").
        k: unrotated keys, same layout with Hk heads (Hq % Hk == 0: GQA/MQA).
        v: values, k's shape.
        position_ids: int `[B, S]`, `[S]` or `[T]` (PoSE skips, packed restarts); None: 0..S-1 per sequence.
        spec: the model's `RopeSpec` (partial rotary: dims past rotary_dim pass through unrotated).
        causal: mask by token order within each sequence (not by position id).
        softmax_scale: defaults to 1/sqrt(D).
        cu_seqlens: int `[num_seqs + 1]` boundaries of the packed sequences ("thd"); no attention across them.
        interleaved: GPT-J pairs.
        backend: "cuda" (hand-written, fp16/bf16, head_dim 64/128), "triton", "torch" or None (Triton on GPUs, the
            torch reference on CPU).
    Returns:
        out in q's layout and dtype.
    """
    _check_qk(q, k, layout, spec)
    if not isinstance(v, torch.Tensor) or v.shape != k.shape or v.dtype != k.dtype or v.device != k.device:
        raise ValueError(f"v must match k in shape, dtype and device; got {tuple(getattr(v, 'shape', ()))} vs "
                         f"{tuple(k.shape)}")
    if v.stride(-1) != 1:
        raise ValueError(f"v: the head dimension must be contiguous (stride 1), got stride {v.stride(-1)}")
    n_q_heads, n_kv_heads = _canonical(q, layout).shape[2], _canonical(k, layout).shape[2]
    if n_q_heads % n_kv_heads:
        raise ValueError(f"q heads ({n_q_heads}) must be a multiple of k/v heads ({n_kv_heads})")
    if layout != "thd" and cu_seqlens is not None:
        raise ValueError("cu_seqlens describes packed sequences: use it with layout='thd'")
    backend = _pick(backend, q.device.type)
    head_dim = q.shape[-1]
    if backend == "triton":
        if head_dim < 32 or head_dim & (head_dim - 1) or head_dim > 256:
            raise ValueError(f"the fused Triton kernel takes head_dim 32, 64, 128 or 256, got {head_dim}")
    if backend == "cuda":
        if q.dtype not in _DTYPE_TAGS:
            raise TypeError(f"the fused CUDA kernel takes float16 or bfloat16, got {q.dtype}; use backend='triton'")
        if head_dim not in (64, 128):
            raise ValueError(f"the fused CUDA kernel takes head_dim 64 or 128, got {head_dim}; use backend='triton'")
    positions = _positions_2d(position_ids, q, layout, cu_seqlens)
    compiling = torch.compiler.is_compiling()
    seq_len = _check_range(positions) if (check_positions or spec.is_dynamic) and not compiling else None
    if spec.is_dynamic and seq_len is None:
        seq_len = int(positions.max()) + 1
    inv_freq = spec.inv_freq_for(seq_len) if spec.is_dynamic else spec.inv_freq
    inv_freq = inv_freq.to(device=q.device, dtype=torch.float32).contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    out, _ = _rope_attention(q, k, v, positions, inv_freq, cu_seqlens, float(spec.attention_scaling), scale, causal,
                             layout, interleaved, spec.angle == "exact", backend)
    return out
