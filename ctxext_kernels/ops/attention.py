"""`rope_attention`: RoPE applied inside the attention prologue, as one autograd-aware custom op.

q and k arrive *unrotated*; the fused kernels rotate each tile in registers from the integer positions (the exact
angle of the RoPE op) and run FlashAttention-2. The "torch" backend is the reference: rotate with the RoPE op's
reference, then attention in fp32 with an explicit mask. Checks are `checks`' (shared with the RoPE op), and so
is the layout handling.
"""

from __future__ import annotations

import math

import torch

from . import checks, cuda_ext, reference
from .rope import _canonical, _triton_status
from .rope import _launcher as _rope_launcher
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
                  "head_dim 64/128; opt-in: it passes the float64-oracle GPU tests on an H200 but measured slower "
                  "there than the Triton backend")


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
        # Triton is the default on GPUs: on an H200 it measured faster than the CUDA kernels, and than RoPE followed by
        # SDPA-flash, forward and forward + backward at 1k-64k tokens (benchmarks/results/nvidia-h200/)
        return "triton" if device_type == "cuda" and available["triton"][0] else "torch"
    if backend not in available:
        raise ValueError(f"backend must be one of {tuple(available)} or None, got {backend!r}")
    if not available[backend][0]:
        raise RuntimeError(f"backend {backend!r} is not usable for {device_type} tensors: {available[backend][1]}")
    return backend


# --------------------------------------------------------------------------------------------- torch reference
def _token_segments(n_tokens: int, cu_seqlens: torch.Tensor | None, device
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sequence index, index within its sequence, length of its sequence) of every token, each `[n_tokens]`; one
    sequence of n_tokens without cu_seqlens."""
    tokens = torch.arange(n_tokens, device=device)
    if cu_seqlens is None:
        return torch.zeros_like(tokens), tokens, torch.full_like(tokens, n_tokens)
    cu = cu_seqlens.to(device, torch.int64)
    segment = torch.searchsorted(cu, tokens, right=True) - 1
    return segment, tokens - cu[segment], (cu[1:] - cu[:-1])[segment]


def _keep_mask(n_q: int, n_k: int, cu_seqlens, cu_seqlens_k, k_leftpad, causal: bool, device) -> torch.Tensor:
    """`[n_q, n_k]` True where a query may attend a key: same sequence and, when causal, key index <= query index +
    (keys - queries) of that sequence (bottom-right alignment: the last query sees every key of its sequence).
    With `k_leftpad` `[B]`: `[B, 1, n_q, n_k]`, and row b's keys before slot k_leftpad[b] are padding."""
    q_seg, q_idx, q_len = _token_segments(n_q, cu_seqlens, device)
    k_seg, k_idx, k_len = _token_segments(n_k, cu_seqlens if cu_seqlens_k is None else cu_seqlens_k, device)
    keep = q_seg[:, None] == k_seg[None, :]
    if causal:
        keep = keep & (k_idx[None, :] <= q_idx[:, None] + k_len[None, :] - q_len[:, None])
    if k_leftpad is not None:
        keep = keep & (k_idx >= k_leftpad.to(device)[:, None, None, None])
    return keep


def _reference_parts(q, k, v, positions, inv_freq, cu_seqlens, cu_seqlens_k, k_leftpad, scaling, softmax_scale,
                     causal, interleaved, exact, k_rotated):
    """fp32 pieces of the reference: rotated q `[B,Sq,Hq,D]`, rotated k and v repeated to Hq heads, the
    probabilities `[B,Hq,Sq,Sk]` (0 for a query that sees no key), the base-e log-sum-exp `[B,Hq,Sq]` (-inf there)
    and cos/sin `[B,Sq,1,D/2]` of the queries (k_rotated: k already carries its rotation; else Sk == Sq and k turns
    by the queries' angles)."""
    cos, sin = reference.rope_angles_cos_sin(positions, inv_freq, scaling, exact=exact)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    group = q.shape[2] // k.shape[2]
    q_rot = reference.rotate(q, cos, sin, interleaved).float()
    k_rot = (k if k_rotated else reference.rotate(k, cos, sin, interleaved)).float().repeat_interleave(group, dim=2)
    v_rep = v.float().repeat_interleave(group, dim=2)
    scores = torch.einsum("bmhd,bnhd->bhmn", q_rot, k_rot) * softmax_scale
    keep = _keep_mask(q.shape[1], k.shape[1], cu_seqlens, cu_seqlens_k, k_leftpad, causal, q.device)
    scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1).masked_fill(~keep.any(-1, keepdim=True), 0.0)  # softmax of none: NaN
    return q_rot, k_rot, v_rep, probs, lse, cos, sin


def _reference_attention(q, k, v, positions, inv_freq, *flags):
    """Canonical `[B,S,H,D]` inputs -> (out in q's dtype, lse base 2 `[B,Sq,Hq]`); flags as `_reference_parts`."""
    *_, v_rep, probs, lse, _, _ = _reference_parts(q, k, v, positions, inv_freq, *flags)
    out = torch.einsum("bhmn,bnhd->bmhd", probs, v_rep)
    return out.to(q.dtype), (lse * _LOG2E).transpose(1, 2)


def _reference_attention_backward(grad_out, q, k, v, positions, inv_freq, cu_seqlens, cu_seqlens_k, k_leftpad,
                                  scaling, softmax_scale, causal, interleaved, exact, k_rotated):
    """The attention backward written out (custom-op bodies run without autograd): canonical dq, dk, dv."""
    q_rot, k_rot, v_rep, probs, _, cos, sin = _reference_parts(q, k, v, positions, inv_freq, cu_seqlens, cu_seqlens_k,
                                                               k_leftpad, scaling, softmax_scale, causal, interleaved,
                                                               exact, k_rotated)
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
    grad_k = grad_k_rot if k_rotated else reference.rotate(grad_k_rot, cos, -sin, interleaved)
    return (reference.rotate(grad_q_rot, cos, -sin, interleaved).to(q.dtype), grad_k.to(k.dtype),
            grad_v.to(v.dtype))


# ------------------------------------------------------------------------------------------ fused launchers
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
    # Upper bounds of the longest sequences size the grid (blocks past a sequence's end return at once): the exact
    # longest of cu_seqlens / cu_seqlens_k would cost a host sync on every call.
    args.max_seqlen_q, args.max_seqlen_k = q.shape[1], k.shape[1]
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


def fused_forward(backend, q, k, v, out, lse, positions, inv_freq, cu_seqlens, scaling, softmax_scale, causal,
                  interleaved, exact, rotate=True, *, cu_seqlens_k=None, k_rotated=False, k_leftpad=None) -> None:
    """Run a fused backend's forward into out `[B,Sq,Hq,D]` and lse fp32 `[B,Sq,Hq]` (canonical views).

    q `[B,Sq,Hq,D]` is unrotated; k, v `[B,Sk,Hk,D]`: k unrotated at the queries' positions (Sk == Sq), or already
    rotated (`k_rotated`: Sk >= Sq, packed keys delimited by `cu_seqlens_k`, default `cu_seqlens`); `k_leftpad`
    int32 `[B]` (Triton only): row b's keys start at slot k_leftpad[b]. Unrotated keys
    are rotated once here by the backend's RoPE kernel; the attention kernel then rotates only Q, once per Q tile.
    `rotate=False` runs the same kernels without RoPE: the benchmark's measure of what the rotation costs.
    """
    if rotate and not k_rotated:
        k_rot = torch.empty_like(k)
        _rope_launcher(backend)(k, None, k_rot, None, positions, inv_freq, scaling, interleaved, False, exact)
        k = k_rot
    cu_seqlens_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    if backend == "cuda":
        assert k_leftpad is None, "rope_attention refuses k_leftpad for the CUDA backend"
        _cuda_forward(q, k, v, out, lse, positions, inv_freq, cu_seqlens, cu_seqlens_k, scaling, softmax_scale, causal,
                      interleaved, exact, rotate)
        return
    from . import triton_attention

    triton_attention.attention_forward(q, k, v, out, lse, positions, inv_freq, cu_seqlens, cu_seqlens_k, scaling,
                                       softmax_scale, causal, interleaved, exact, rotate, k_leftpad)


def fused_backward(backend, grad_out, q, k, v, out, lse, dq, dk, dv, positions, inv_freq, cu_seqlens, scaling,
                   softmax_scale, causal, interleaved, exact, rotate=True, *, cu_seqlens_k=None,
                   k_rotated=False, k_leftpad=None) -> None:
    """Run a fused backend's backward into dq, dk, dv: gradients of the unrotated q, of k as it came in (unrotated,
    or rotated with `k_rotated`) and of v; arguments as `fused_forward`.

    q (and unrotated k) are rotated once by the backend's RoPE kernel (every dK/dV block reads each Q tile); the dQ
    kernel rotates dQ back in its epilogue; dK of keys rotated here is rotated back in place by the RoPE kernel (the
    angle negated: the rotation's transpose).
    """
    rope = _rope_launcher(backend)
    rotate_k = rotate and not k_rotated
    q_rot, k_rot = q, k
    if rotate:  # one RoPE launch for both: cos/sin once per token
        q_rot, k_rot = torch.empty_like(q), torch.empty_like(k) if rotate_k else k
        rope(q, k if rotate_k else None, q_rot, k_rot if rotate_k else None, positions, inv_freq, scaling, interleaved,
             False, exact)
    cu_seqlens_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    if backend == "cuda":
        assert k_leftpad is None, "rope_attention refuses k_leftpad for the CUDA backend"
        _cuda_backward(grad_out, q_rot, k_rot, v, out, lse, dq, dk, dv, positions, inv_freq, cu_seqlens, cu_seqlens_k,
                       scaling, softmax_scale, causal, interleaved, exact, rotate)
    else:
        from . import triton_attention

        triton_attention.attention_backward(grad_out, q_rot, k_rot, v, out, lse, dq, dk, dv, positions, inv_freq,
                                            cu_seqlens, cu_seqlens_k, scaling, softmax_scale, causal, interleaved,
                                            exact, rotate, k_leftpad)
    if rotate_k:
        rope(dk, None, dk, None, positions, inv_freq, scaling, interleaved, True, exact)


# ---------------------------------------------------------------------------------------------------- custom ops
def _lse_shape(q: torch.Tensor, layout: str) -> tuple[int, int, int]:
    b, s, h, _ = _canonical(q, layout).shape
    return b, s, h


@torch.library.custom_op("ctxext::rope_attention", mutates_args=())
def _rope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    inv_freq: torch.Tensor, cu_seqlens: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                    k_leftpad: torch.Tensor | None, scaling: float, softmax_scale: float, causal: bool, layout: str,
                    interleaved: bool, exact: bool, k_rotated: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out in q's layout, lse fp32 `[B, Sq, Hq]` base 2); q unrotated, k unrotated unless k_rotated."""
    qc, kc, vc = (_canonical(x, layout) for x in (q, k, v))
    if backend == "torch":
        out_c, lse = _reference_attention(qc, kc, vc, positions, inv_freq, cu_seqlens, cu_seqlens_k, k_leftpad,
                                          scaling, softmax_scale, causal, interleaved, exact, k_rotated)
        out = torch.empty_like(q)
        _canonical(out, layout).copy_(out_c)
        return out, lse.contiguous()
    out, lse = torch.empty_like(q), q.new_empty(_lse_shape(q, layout), dtype=torch.float32)
    fused_forward(backend, qc, kc, vc, _canonical(out, layout), lse, positions, inv_freq, cu_seqlens, scaling,
                  softmax_scale, causal, interleaved, exact, cu_seqlens_k=cu_seqlens_k, k_rotated=k_rotated,
                  k_leftpad=k_leftpad)
    return out, lse


@_rope_attention.register_fake
def _(q, k, v, positions, inv_freq, cu_seqlens, cu_seqlens_k, k_leftpad, scaling, softmax_scale, causal, layout,
      interleaved, exact, k_rotated, backend):
    return torch.empty_like(q), q.new_empty(_lse_shape(q, layout), dtype=torch.float32)


@torch.library.custom_op("ctxext::rope_attention_backward", mutates_args=())
def _rope_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                             cu_seqlens: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                             k_leftpad: torch.Tensor | None, scaling: float,
                             softmax_scale: float, causal: bool, layout: str, interleaved: bool, exact: bool,
                             k_rotated: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the unrotated q, of k (unrotated unless k_rotated) and of v."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if backend == "torch":
        grads = _reference_attention_backward(*(_canonical(x, layout) for x in (grad_out, q, k, v)), positions,
                                              inv_freq, cu_seqlens, cu_seqlens_k, k_leftpad, scaling, softmax_scale,
                                              causal, interleaved, exact, k_rotated)
        for dst, grad in zip((dq, dk, dv), grads):
            _canonical(dst, layout).copy_(grad)
        return dq, dk, dv
    fused_backward(backend, *(_canonical(x, layout) for x in (grad_out, q, k, v, out)), lse,
                   *(_canonical(x, layout) for x in (dq, dk, dv)), positions, inv_freq, cu_seqlens, scaling,
                   softmax_scale, causal, interleaved, exact, cu_seqlens_k=cu_seqlens_k, k_rotated=k_rotated,
                   k_leftpad=k_leftpad)
    return dq, dk, dv


@_rope_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, positions, inv_freq, cu_seqlens, cu_seqlens_k, k_leftpad, scaling, softmax_scale,
      causal, layout, interleaved, exact, k_rotated, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, positions, inv_freq, cu_seqlens, cu_seqlens_k, k_leftpad, *flags = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, positions, inv_freq, cu_seqlens, cu_seqlens_k, k_leftpad)
    ctx.flags = flags  # scaling, softmax_scale, causal, layout, interleaved, exact, k_rotated, backend


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, positions, inv_freq, cu_seqlens, cu_seqlens_k, k_leftpad = ctx.saved_tensors
    dq, dk, dv = _rope_attention_backward(grad_out, q, k, v, out, lse, positions, inv_freq, cu_seqlens, cu_seqlens_k,
                                          k_leftpad, *ctx.flags)
    return dq, dk, dv, *(None,) * 13


_rope_attention.register_autograd(_backward, setup_context=_setup_context)


# -------------------------------------------------------------------------------------------------------- public
def _check_boundaries(q, k, layout, cu_seqlens, cu_seqlens_k, k_rotated) -> None:
    """Free checks of the packed-sequence boundaries (their values: `checks.check_values`)."""
    if layout != "thd":
        if cu_seqlens is not None or cu_seqlens_k is not None:
            raise ValueError("cu_seqlens/cu_seqlens_k describe packed sequences: use them with layout='thd'")
        return
    for name, cu in (("cu_seqlens", cu_seqlens), ("cu_seqlens_k", cu_seqlens_k)):
        if cu is not None:
            checks.check_cu_seqlens(name, cu, q.device)
    if cu_seqlens_k is None:
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"packed q ({q.shape[0]} tokens) and k ({k.shape[0]} tokens) differ in length: pass "
                             "both cu_seqlens and cu_seqlens_k")
        return
    if not k_rotated:
        raise ValueError("cu_seqlens_k gives keys their own sequence lengths, which only already rotated keys can "
                         "have: pass k_rotated=True")
    if cu_seqlens is None:
        raise ValueError("cu_seqlens_k needs cu_seqlens (the queries' boundaries)")
    if cu_seqlens_k.numel() != cu_seqlens.numel():
        raise ValueError(f"cu_seqlens_k must describe as many sequences as cu_seqlens, got {cu_seqlens_k.numel()} "
                         f"and {cu_seqlens.numel()} entries")


def rope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor | None,
                   spec: RopeSpec, *, causal: bool = True, softmax_scale: float | None = None, layout: str = "bhsd",
                   cu_seqlens: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                   k_leftpad: torch.Tensor | None = None, interleaved: bool = False, k_rotated: bool = False,
                   backend: str | None = None, check_positions: bool = True) -> torch.Tensor:
    """Attention over q and k rotated by their positions inside the kernel (rotated q/k never reach memory).

    Args:
        q: unrotated queries `[B, Hq, Sq, D]` ("bhsd"), `[B, Sq, Hq, D]` ("bshd") or `[Tq, Hq, D]` ("thd").
        k: keys, same layout with Hk heads (Hq % Hk == 0: GQA/MQA); unrotated, at the queries' positions (Sk == Sq),
            unless `k_rotated`.
        v: values, k's shape.
        position_ids: int `[B, Sq]`, `[Sq]` or `[Tq]`: the queries' positions (PoSE skips, packed restarts); None:
            0..Sq-1 per sequence.
        spec: the model's `RopeSpec` (partial rotary: dims past rotary_dim pass through unrotated).
        causal: mask by token order within each sequence (not by position id); with more keys than queries the
            queries are the sequence's last tokens (query i sees keys j <= i + Sk - Sq).
        softmax_scale: defaults to 1/sqrt(D).
        cu_seqlens: int `[num_seqs + 1]` boundaries of the packed query sequences ("thd"); no attention across them.
        cu_seqlens_k: the packed key sequences' boundaries when they differ from the queries' (k_rotated only).
        k_leftpad: int `[B]` ("bhsd"/"bshd"; flash-attn's `cache_leftpad`): row b's keys start at slot k_leftpad[b],
            the slots before it are padding. Causal alignment stays at the end of the key buffer, so a query left of
            its row's first key sees no key: output 0. Not for backend "cuda".
        interleaved: GPT-J pairs.
        k_rotated: k already carries its rotation (`apply_rope`'s output, a cache of rotated keys), so it may be
            longer than q: `[B, Hk, Sk, D]` with Sk >= Sq, or packed with `cu_seqlens_k`.
        backend: "cuda" (hand-written, fp16/bf16, head_dim 64/128), "triton", "torch" or None (Triton on GPUs, the
            torch reference on CPU).
        check_positions: check the values of position_ids (in [0, 2^24)), cu_seqlens and cu_seqlens_k (from 0 to
            the token counts, non-decreasing, at least as many keys as queries per sequence) and k_leftpad (in
            [0, Sk]): one host sync;
            skipped under torch.compile. Pass False only for inputs known to be valid: the kernels trust the
            boundaries, and a bad one is an out-of-bounds memory access.
    Returns:
        out in q's layout and dtype.
    """
    checks.check_spec(spec)
    checks.check_flags(causal=causal, interleaved=interleaved, k_rotated=k_rotated, check_positions=check_positions)
    checks.check_softmax_scale(softmax_scale)
    checks.check_qk(q, k, layout, spec, keys_may_extend=k_rotated)
    checks.check_v(v, k)
    n_q_heads, n_kv_heads = checks.head_count(q, layout), checks.head_count(k, layout)
    if n_q_heads < 1 or n_kv_heads < 1 or n_q_heads % n_kv_heads:
        raise ValueError(f"q heads ({n_q_heads}) must be a positive multiple of k/v heads ({n_kv_heads})")
    _check_boundaries(q, k, layout, cu_seqlens, cu_seqlens_k, k_rotated)
    if k_leftpad is not None:
        checks.check_leftpad(k_leftpad, q, layout)
        if backend == "cuda":
            raise NotImplementedError("the fused CUDA kernel has no k_leftpad (left-padded keys); use backend='triton'")
    backend = _pick(backend, q.device.type)
    head_dim = q.shape[-1]
    if backend == "triton":
        limit = 128 if q.dtype == torch.float32 else 256  # fp32 at 256 spills registers (ops/triton_configs.py)
        if head_dim > limit:
            raise ValueError(f"the fused Triton kernel takes {q.dtype} with head_dim up to {limit}, got {head_dim}")
    if backend == "cuda":
        if q.dtype not in _DTYPE_TAGS:
            raise TypeError(f"the fused CUDA kernel takes float16 or bfloat16, got {q.dtype}; use backend='triton'")
        if head_dim not in (64, 128):
            raise ValueError(f"the fused CUDA kernel takes head_dim 64 or 128, got {head_dim}; use backend='triton'")
    positions = checks.positions_2d(position_ids, q, layout, cu_seqlens)
    seq_len = checks.check_values(positions, check=check_positions, want_max=spec.is_dynamic, cu_seqlens=cu_seqlens,
                                  n_tokens=q.shape[0], cu_seqlens_k=cu_seqlens_k, n_keys=k.shape[0],
                                  k_leftpad=k_leftpad, keys_per_row=checks.token_dims(k, layout)[-1])
    inv_freq = spec.inv_freq_for(seq_len) if spec.is_dynamic else spec.inv_freq
    inv_freq = inv_freq.to(device=q.device, dtype=torch.float32).contiguous()
    cu_seqlens, cu_seqlens_k, k_leftpad = (None if cu is None else cu.to(torch.int32).contiguous()
                                           for cu in (cu_seqlens, cu_seqlens_k, k_leftpad))
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    out, _ = _rope_attention(q, k, v, positions, inv_freq, cu_seqlens, cu_seqlens_k, k_leftpad,
                             float(spec.attention_scaling),
                             scale, causal, layout, interleaved, spec.angle == "exact", k_rotated, backend)
    return out
