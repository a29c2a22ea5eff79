"""The RoPE custom ops: layout handling, backend dispatch and autograd.

`apply_rope` is the public entry. It validates everything first (`checks`: nothing is launched, and nothing is
written to the caller's tensors, on error), turns the layout into canonical `[B, S, H, D]` views without copying,
and calls one of three custom ops: `ctxext::rope` (out of place, autograd-aware), `ctxext::rope_` (in place) or
`ctxext::rope_keys` (k alone). All run the same launcher on the chosen backend; backward is the forward launcher with
the angle negated.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from . import checks, cuda_ext, reference
from .spec import RopeSpec

BACKENDS = ("cuda", "triton", "cpu", "torch")


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
        inplace: write into q and k and return them. Refused (before anything is written) when q and k share
            memory, when either has elements sharing one location (expanded views), or for a leaf that requires grad.
        cu_seqlens: int `[num_seqs + 1]` sequence starts of a packed "thd" batch (on q's device), used when
            position_ids is None.
        backend: "cuda", "triton", "cpu", "torch" or None for the best one for the tensors' device.
        check_positions: check the values of position_ids (in [0, 2^24)) and cu_seqlens (0 to T, non-decreasing):
            one host sync; skipped under torch.compile. Pass False only for inputs known to be valid.
    Returns:
        (q_rot, k_rot) in q's layout and dtype.

    Example:
        >>> spec = RopeSpec.from_params(head_dim=64, rope_theta=1e4)
        >>> q, k = torch.randn(1, 8, 16, 64), torch.randn(1, 2, 16, 64)
        >>> q_rot, k_rot = apply_rope(q, k, torch.arange(16), spec)
    """
    checks.check_spec(spec)
    checks.check_flags(interleaved=interleaved, inplace=inplace, check_positions=check_positions)
    if q is None and inplace:
        raise ValueError("inplace=True rotates q and k together: pass q, or rotate k out of place (inplace=False)")
    checks.check_qk(q, k, layout, spec)
    backend = _resolve_backend(backend, k.device.type)
    if inplace:
        checks.check_inplace(q, k)
    if cu_seqlens is not None:
        if layout != "thd":
            raise ValueError(f"cu_seqlens describes packed sequences: use it with layout='thd', not {layout!r}")
        checks.check_cu_seqlens("cu_seqlens", cu_seqlens, k.device)
    positions = checks.positions_2d(position_ids, k, layout, cu_seqlens)
    seq_len = checks.check_values(positions, check=check_positions, want_max=spec.is_dynamic, cu_seqlens=cu_seqlens,
                                  n_tokens=k.shape[0])
    inv_freq = spec.inv_freq_for(seq_len) if spec.is_dynamic else spec.inv_freq
    inv_freq = inv_freq.to(device=k.device, dtype=torch.float32).contiguous()
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
    checks.check_tensor("position_ids", position_ids)
    if position_ids.dtype not in checks.INDEX_DTYPES:
        raise TypeError(f"position_ids must be an integer tensor (int32 or int64), got {position_ids.dtype}")
    checks.check_spec(spec)
    checks.check_out_dtype(dtype)
    seq_len = checks.check_values(position_ids, check=True, want_max=True)
    inv_freq = spec.inv_freq_for(seq_len).to(position_ids.device)
    cos, sin = reference.rope_angles_cos_sin(position_ids, inv_freq, spec.attention_scaling,
                                             exact=spec.angle == "exact")
    cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    return cos.to(dtype or torch.float32), sin.to(dtype or torch.float32)
