"""The RoPE custom ops: argument checks, layout handling, backend dispatch and autograd.

`apply_rope` is the public entry. It validates everything first (so nothing is written to the caller's tensors on
error), turns the layout into canonical `[B, S, H, D]` views without copying, and calls one of two custom ops:
`ctxext::rope` (out of place, autograd-aware) or `ctxext::rope_` (in place). Both run the same launcher on the chosen
backend; backward is the forward launcher with the angle negated.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from . import cuda_ext, reference
from .spec import MAX_POSITION, RopeSpec

LAYOUTS = ("bhsd", "bshd", "thd")
BACKENDS = ("cuda", "triton", "cpu", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------------- backends
def _triton_status(device_type: str) -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton is not installed ({exc})"
    if device_type == "cuda":
        return True, "triton kernels compiled for the GPU"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "TRITON_INTERPRET=1: triton kernels run in the CPU interpreter (slow, for testing)"
    return False, "CPU tensors need TRITON_INTERPRET=1 for triton (interpreter, slow)"


def backends(device: str | torch.device | None = None) -> dict[str, tuple[bool, str]]:
    """Which backends can run RoPE on `device` (default: CUDA if available, else CPU), and why not the others.

    Returns:
        `{name: (usable, reason)}` for "cuda", "triton", "cpu" and "torch".
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    cuda_ok, host_ok, ext_reason = cuda_ext.status()
    on_gpu = device_type == "cuda"
    return {
        "cuda": (cuda_ok and on_gpu, ext_reason if not cuda_ok else "CUDA extension" if on_gpu
                 else "the CUDA extension needs CUDA tensors"),
        "triton": _triton_status(device_type),
        "cpu": (host_ok and not on_gpu, "host build of the CUDA code's math" if host_ok and not on_gpu
                else ext_reason if not host_ok else "the host build takes CPU tensors"),
        "torch": (True, "pure-PyTorch reference"),
    }


def _launcher(backend: str) -> Callable:
    if backend in ("cuda", "cpu"):
        return cuda_ext.rope_forward
    if backend == "triton":
        from . import triton_rope  # imported lazily: triton is optional on CPU-only installs

        return triton_rope.rope_forward
    return reference.rope_forward


@torch.compiler.assume_constant_result  # host configuration: torch.compile bakes the choice in, never traces it
def _resolve_backend(backend: str | None, device_type: str) -> str:
    device = torch.device(device_type)
    available = backends(device)
    if backend is None:
        preference = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
        return next(name for name in preference if available[name][0])
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    usable, reason = available[backend]
    if not usable:
        raise RuntimeError(f"backend {backend!r} is not usable for {device.type} tensors: {reason}")
    return backend


# --------------------------------------------------------------------------------------------------- custom ops
def _canonical(x: torch.Tensor | None, layout: str) -> torch.Tensor | None:
    """A `[B, S, H, D]` view of x in `layout`, without copying."""
    if x is None:
        return None
    if layout == "bhsd":
        return x.transpose(1, 2)
    return x.unsqueeze(0) if layout == "thd" else x


def _launch(q, k, q_out, k_out, positions, inv_freq, scaling, layout, interleaved, conjugate, exact, backend):
    _launcher(backend)(_canonical(q, layout), _canonical(k, layout), _canonical(q_out, layout),
                       _canonical(k_out, layout), positions, inv_freq, scaling, interleaved, conjugate, exact)


@torch.library.custom_op("ctxext::rope", mutates_args=())
def _rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
          layout: str, interleaved: bool, conjugate: bool, exact: bool, backend: str
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-place fused q+k rotation; positions are already `[B, S]` (`[1, T]` for "thd")."""
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    _launch(q, k, q_out, k_out, positions, inv_freq, scaling, layout, interleaved, conjugate, exact, backend)
    return q_out, k_out


@_rope.register_fake
def _(q, k, positions, inv_freq, scaling, layout, interleaved, conjugate, exact, backend):
    torch._check(q.dtype == k.dtype, lambda: "q and k must have the same dtype")
    torch._check(inv_freq.dtype == torch.float32, lambda: "inv_freq must be float32")
    return torch.empty_like(q), torch.empty_like(k)


def _rope_backward(ctx, grad_q, grad_k):
    # The rotation is orthogonal (times the scaling): its transpose is the rotation by -angle, i.e. the same kernel
    # with the angle negated. Incoming gradients can be expanded (stride 0), which the kernels don't take.
    grad_q = torch.zeros_like(ctx.q_like) if grad_q is None else _last_dim_contiguous(grad_q)
    grad_k = torch.zeros_like(ctx.k_like) if grad_k is None else _last_dim_contiguous(grad_k)
    positions, inv_freq = ctx.saved_tensors
    dq, dk = _rope(grad_q, grad_k, positions, inv_freq, ctx.scaling, ctx.layout, ctx.interleaved, not ctx.conjugate,
                   ctx.exact, ctx.backend)
    return dq, dk, None, None, None, None, None, None, None, None


def _rope_setup_context(ctx, inputs, output):
    q, k, positions, inv_freq, scaling, layout, interleaved, conjugate, exact, backend = inputs
    ctx.save_for_backward(positions, inv_freq)
    ctx.q_like, ctx.k_like = torch.empty_like(q, device="meta"), torch.empty_like(k, device="meta")
    ctx.scaling, ctx.layout, ctx.interleaved, ctx.conjugate = scaling, layout, interleaved, conjugate
    ctx.exact, ctx.backend = exact, backend


_rope.register_autograd(_rope_backward, setup_context=_rope_setup_context)


@torch.library.custom_op("ctxext::rope_keys", mutates_args=())
def _rope_keys(k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, layout: str,
               interleaved: bool, conjugate: bool, exact: bool, backend: str) -> torch.Tensor:
    """Out-of-place rotation of one tensor (keys alone: the fused attention's K pass, KV-cache appends)."""
    k_out = torch.empty_like(k)
    _launch(k, None, k_out, None, positions, inv_freq, scaling, layout, interleaved, conjugate, exact, backend)
    return k_out


@_rope_keys.register_fake
def _(k, positions, inv_freq, scaling, layout, interleaved, conjugate, exact, backend):
    torch._check(inv_freq.dtype == torch.float32, lambda: "inv_freq must be float32")
    return torch.empty_like(k)


def _rope_keys_setup_context(ctx, inputs, output):
    k, positions, inv_freq, *ctx.flags = inputs
    ctx.save_for_backward(positions, inv_freq)


def _rope_keys_backward(ctx, grad_k):
    positions, inv_freq = ctx.saved_tensors
    scaling, layout, interleaved, conjugate, exact, backend = ctx.flags
    return (_rope_keys(_last_dim_contiguous(grad_k), positions, inv_freq, scaling, layout, interleaved, not conjugate,
                       exact, backend), None, None, None, None, None, None, None, None)


_rope_keys.register_autograd(_rope_keys_backward, setup_context=_rope_keys_setup_context)


@torch.library.custom_op("ctxext::rope_", mutates_args=("q", "k"))
def _rope_inplace(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
                  layout: str, interleaved: bool, conjugate: bool, exact: bool, backend: str) -> None:
    """In-place fused q+k rotation (same kernels, output pointers = input pointers)."""
    _launch(q, k, q, k, positions, inv_freq, scaling, layout, interleaved, conjugate, exact, backend)


@_rope_inplace.register_fake
def _(q, k, positions, inv_freq, scaling, layout, interleaved, conjugate, exact, backend):
    return None


class _RopeInplace(torch.autograd.Function):
    """Autograd for the in-place op (custom ops that mutate cannot register autograd themselves)."""

    @staticmethod
    def forward(ctx, q, k, positions, inv_freq, scaling, layout, interleaved, exact, backend):
        _rope_inplace(q, k, positions, inv_freq, scaling, layout, interleaved, False, exact, backend)
        ctx.mark_dirty(q, k)
        ctx.save_for_backward(positions, inv_freq)
        ctx.args = (scaling, layout, interleaved, exact, backend)
        return q, k

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        scaling, layout, interleaved, exact, backend = ctx.args
        positions, inv_freq = ctx.saved_tensors
        dq, dk = _rope(_last_dim_contiguous(grad_q), _last_dim_contiguous(grad_k), positions, inv_freq, scaling,
                       layout, interleaved, True, exact, backend)
        return dq, dk, None, None, None, None, None, None, None


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# ------------------------------------------------------------------------------------------------------ checks
def _check_qk(q: torch.Tensor, k: torch.Tensor, layout: str, spec: RopeSpec, keys_may_extend: bool = False) -> None:
    """Named checks of q and k. keys_may_extend: k may hold more tokens than q (already rotated keys of a KV cache):
    same batch and at least as many keys per sequence ("thd": any counts, cu_seqlens_k says which keys are whose)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    want = 3 if layout == "thd" else 4
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != want:
            raise ValueError(f"{name} must be {want}-D for layout {layout!r} ({_SHAPES[layout]}), got shape "
                             f"{tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
        if x.stride(-1) != 1:
            raise ValueError(f"{name}: the head dimension must be contiguous (stride 1), got stride {x.stride(-1)}; "
                             "call .contiguous() first")
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must have the same dtype, got {q.dtype} and {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on the same device, got {q.device} and {k.device}")
    q_tokens, k_tokens = _token_dims(q, layout), _token_dims(k, layout)
    if keys_may_extend:
        if layout != "thd" and (q_tokens[0] != k_tokens[0] or k_tokens[1] < q_tokens[1]):
            raise ValueError(f"k must have q's batch and at least its sequence length, got q {q_tokens} and k "
                             f"{k_tokens} (batch, seq)")
    elif q_tokens != k_tokens:
        raise ValueError(f"q and k must have the same batch/sequence dims, got {q_tokens} and {k_tokens}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    if spec.rotary_dim > q.shape[-1] or spec.rotary_dim % 2:
        raise ValueError(f"spec.rotary_dim={spec.rotary_dim} must be even and <= head_dim={q.shape[-1]}")


_SHAPES = {"bhsd": "[batch, heads, seq, head_dim]", "bshd": "[batch, seq, heads, head_dim]",
           "thd": "[total_tokens, heads, head_dim]"}


def _token_dims(x: torch.Tensor, layout: str) -> tuple[int, ...]:
    return {"bhsd": (x.shape[0], x.shape[2]), "bshd": tuple(x.shape[:2]), "thd": (x.shape[0],)}[layout]


def _positions_2d(position_ids, q, layout, cu_seqlens) -> torch.Tensor:
    """position_ids as `[B, S]` (`[1, T]` for "thd"), a view where possible."""
    tokens = _token_dims(q, layout)
    if position_ids is None:
        if layout == "thd":
            if cu_seqlens is None:
                raise ValueError("layout 'thd' needs position_ids or cu_seqlens")
            return _positions_from_cu_seqlens(cu_seqlens, tokens[0], q.device)[None]
        return torch.arange(tokens[1], device=q.device)[None]
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"position_ids must be a torch.Tensor, got {type(position_ids).__name__}")
    if position_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"position_ids must be an integer tensor (int32 or int64), got {position_ids.dtype}")
    if position_ids.device != q.device:
        raise ValueError(f"position_ids is on {position_ids.device} but q is on {q.device}")
    pos = position_ids if position_ids.dim() == 2 else position_ids[None]
    expected = (1,) + tokens if layout == "thd" else tokens
    if pos.dim() != 2 or pos.shape[1] != expected[-1] or pos.shape[0] not in (1, expected[0]):
        raise ValueError(f"position_ids must be [batch, seq], [seq] or [total_tokens] matching q's tokens {tokens}, "
                         f"got shape {tuple(position_ids.shape)}")
    return pos.expand(expected)


def _positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int, device) -> torch.Tensor:
    """0, 1, ... restarting at each packed sequence start: `[T]` from cu_seqlens `[num_seqs + 1]`."""
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    if cu.dim() != 1 or int(cu[-1]) != total or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must be a non-decreasing 1-D tensor from 0 to total_tokens={total}, got "
                         f"{cu_seqlens.tolist()}")
    tokens = torch.arange(total, device=device)
    starts = cu[torch.searchsorted(cu, tokens, right=True) - 1]
    return tokens - starts


def _check_range(positions: torch.Tensor) -> int:
    """Raise on positions outside [0, 2^24); return max position + 1 (one host sync for both)."""
    if positions.numel() == 0:
        return 0
    lo, hi = torch.aminmax(positions)
    lo, hi = int(lo), int(hi)
    if lo < 0:
        raise ValueError(f"position_ids must be non-negative, found {lo}")
    if hi > MAX_POSITION:
        raise ValueError(f"position_ids must be below 2^24 = {MAX_POSITION + 1} (exact fp32 integers), found {hi}")
    return hi + 1


# ------------------------------------------------------------------------------------------------------ public
def apply_rope(q: torch.Tensor | None, k: torch.Tensor, position_ids: torch.Tensor | None, spec: RopeSpec, *,
               layout: str = "bhsd", interleaved: bool = False, inplace: bool = False,
               cu_seqlens: torch.Tensor | None = None, backend: str | None = None,
               check_positions: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by their positions' angles in one fused launch.

    Args:
        q: `[B, Hq, S, D]` ("bhsd"), `[B, S, Hq, D]` ("bshd") or `[T, Hq, D]` ("thd"); fp32, fp16 or bf16; any strides
            with a contiguous head dim.
        k: the same with Hk heads (GQA/MQA: Hk may differ from Hq). With q None, k is rotated alone (out of
            place; returns `(None, k_rot)`): keys for `rope_attention(..., k_rotated=True)` or a KV cache.
        position_ids: int32/int64 `[B, S]`, `[S]` or `[T]`, any non-negative values below 2^24 (PoSE skips, restarts
            in packed batches); None means 0..S-1 (per sequence of cu_seqlens for "thd").
        spec: the model's `RopeSpec`: frequencies, rotary_dim (dims beyond it pass through), attention scaling,
            angle mode.
        interleaved: rotate (x[2i], x[2i+1]) pairs (GPT-J) instead of (x[i], x[i + rotary_dim/2]) (NeoX/transformers).
        inplace: write into q and k and return them.
        cu_seqlens: int `[num_seqs + 1]` sequence starts of a packed "thd" batch, used when position_ids is None.
        backend: "cuda", "triton", "cpu", "torch" or None for the best one for the tensors' device.
        check_positions: validate the position range (one host sync; it is skipped under torch.compile).
    Returns:
        (q_rot, k_rot) in q's layout and dtype.

    Example:
        >>> spec = RopeSpec.from_params(head_dim=64, rope_theta=1e4)
        >>> q, k = torch.randn(1, 8, 16, 64), torch.randn(1, 2, 16, 64)
        >>> q_rot, k_rot = apply_rope(q, k, torch.arange(16), spec)
    """
    if q is None:  # keys alone: checked as a tensor that is its own partner
        if inplace:
            raise ValueError("inplace=True rotates q and k together: pass q, or rotate k out of place (inplace=False)")
        _check_qk(k, k, layout, spec)
    else:
        _check_qk(q, k, layout, spec)
    positions = _positions_2d(position_ids, k, layout, cu_seqlens)
    compiling = torch.compiler.is_compiling()
    seq_len = _check_range(positions) if (check_positions or spec.is_dynamic) and not compiling else None
    if spec.is_dynamic:
        if seq_len is None:
            seq_len = int(positions.max()) + 1
        inv_freq = spec.inv_freq_for(seq_len)
    else:
        inv_freq = spec.inv_freq
    inv_freq = inv_freq.to(device=k.device, dtype=torch.float32).contiguous()
    backend = _resolve_backend(backend, k.device.type)
    args = (positions, inv_freq, float(spec.attention_scaling), layout, interleaved)
    exact = spec.angle == "exact"
    if q is None:
        return None, _rope_keys(k, *args, False, exact, backend)
    if inplace:
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            return _RopeInplace.apply(q, k, *args, exact, backend)
        _rope_inplace(q, k, *args, False, exact, backend)
        return q, k
    return _rope(q, k, *args, False, exact, backend)


def rope_cos_sin(position_ids: torch.Tensor, spec: RopeSpec, dtype: torch.dtype | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers-style cos/sin tables from exact angles, for code that rotates by itself.

    Args:
        position_ids: int `[..., S]`.
        spec: the model's `RopeSpec`.
        dtype: output dtype (default float32).
    Returns:
        cos, sin: `[..., S, rotary_dim]` (each frequency twice, half-split order), times the attention scaling.
    """
    if position_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"position_ids must be an integer tensor (int32 or int64), got {position_ids.dtype}")
    seq_len = _check_range(position_ids)
    inv_freq = spec.inv_freq_for(seq_len).to(position_ids.device)
    cos, sin = reference.rope_angles_cos_sin(position_ids, inv_freq, spec.attention_scaling,
                                             exact=spec.angle == "exact")
    cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    return cos.to(dtype or torch.float32), sin.to(dtype or torch.float32)
