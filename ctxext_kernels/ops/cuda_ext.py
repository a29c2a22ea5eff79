"""Loader and launcher for the native extension `ctxext_kernels._C` (the CUDA kernel and its host build).

The extension is torch-free: it takes data pointers, shapes, strides, a dtype tag and the CUDA stream as plain
values. This module is the only place that turns tensors into those values (one `RopeArgs`, filled by name).
"""

from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType

import torch

_DTYPE_TAGS = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    """Import `_C` once; return (module or None, why not)."""
    try:
        return importlib.import_module("ctxext_kernels._C"), ""
    except ImportError as exc:
        return None, f"extension not built (no C++ compiler or the build failed at install time: {exc})"


def _cuda_problem(ext: ModuleType) -> str:
    """Why the CUDA kernels cannot run here, or "" when they can."""
    if not ext.has_cuda:
        return "extension built without CUDA (no nvcc at install time, CTXEXT_BUILD_CUDA=0, or its CUDA build failed)"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    built_major = ext.cuda_version.split(".")[0]
    torch_cuda = torch.version.cuda or "none"
    if torch_cuda.split(".")[0] != built_major:
        return f"built with CUDA {ext.cuda_version} but torch uses CUDA {torch_cuda}; using Triton instead"
    major, minor = torch.cuda.get_device_capability()
    device_arch = 10 * major + minor
    # Every arch is built as SASS + PTX, so any arch <= the GPU's runs (natively or JIT-compiled).
    built = [int(arch.rstrip("af")) for arch in ext.cuda_archs]
    if not any(arch <= device_arch for arch in built):
        archs = ",".join(f"sm_{arch}" for arch in ext.cuda_archs)
        return f"built for {archs} but the GPU is sm_{device_arch}; using Triton instead"
    return ""


@functools.cache
def status() -> tuple[bool, bool, str]:
    """Whether the extension's CUDA kernels and host build are usable here.

    Returns:
        `(cuda_usable, host_usable, reason)`; `reason` says why something is unusable ("" when both are usable).
        A build that does not match this machine's GPU or torch warns once.
    """
    ext, reason = _load()
    if ext is None:
        return False, False, reason
    problem = _cuda_problem(ext)
    if problem and ext.has_cuda and torch.cuda.is_available():
        warnings.warn(f"ctxext_kernels: CUDA extension unusable: {problem}", RuntimeWarning, stacklevel=2)
    return not problem, True, problem


def _view(x: torch.Tensor | None, ext: ModuleType):
    if x is None:
        return ext.TensorView()
    return ext.TensorView(x.data_ptr(), x.shape, x.stride())  # torch.Size and stride tuples convert as sequences


def rope_forward(q: torch.Tensor, k: torch.Tensor | None, q_out: torch.Tensor, k_out: torch.Tensor | None,
                 positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, interleaved: bool, conjugate: bool,
                 exact: bool) -> None:
    """The launcher contract (see ops/rope.py) on the CUDA kernel (CUDA tensors) or its host build (CPU tensors).

    Args:
        q, q_out: `[B, S, Hq, D]`, head dim contiguous; q_out may be q (in place).
        k, k_out: `[B, S, Hk, D]` or both None.
        positions: `[B, S]` int32/int64, any strides, values in [0, 2^24).
        inv_freq: fp32 `[rotary_dim // 2]`, contiguous.
        scaling: multiplies cos and sin.
        interleaved: GPT-J pairs instead of half-split.
        conjugate: rotate by -angle.
        exact: exact angle product (False: transformers' fp32 product).
    """
    ext, reason = _load()
    if ext is None:
        raise RuntimeError(f"ctxext_kernels._C is unavailable: {reason}")
    tensors = {"q": q, "k": k, "q_out": q_out, "k_out": k_out}
    for name, x in tensors.items():
        if x is not None and (x.dtype != q.dtype or x.device != q.device):
            raise ValueError(f"{name}: expected {q.dtype} on {q.device} like q, got {x.dtype} on {x.device}")
    if q.dtype not in _DTYPE_TAGS:
        raise ValueError(f"q: dtype must be one of {list(_DTYPE_TAGS)}, got {q.dtype}")
    if positions.dtype not in (torch.int32, torch.int64) or positions.device != q.device:
        raise ValueError(f"positions: expected int32 or int64 on {q.device}, got {positions.dtype} on "
                         f"{positions.device}")
    if inv_freq.dtype != torch.float32 or inv_freq.device != q.device:
        raise ValueError(f"inv_freq: expected float32 on {q.device}, got {inv_freq.dtype} on {inv_freq.device}")

    args = ext.RopeArgs()
    args.q, args.k, args.q_out, args.k_out = (_view(x, ext) for x in (q, k, q_out, k_out))
    args.positions, args.inv_freq = _view(positions, ext), _view(inv_freq, ext)
    args.dtype = getattr(ext.DType, _DTYPE_TAGS[q.dtype])
    args.positions_int64 = positions.dtype == torch.int64
    args.scaling, args.interleaved, args.conjugate, args.exact = float(scaling), interleaved, conjugate, exact
    if q.is_cuda:
        args.device = q.device.index if q.device.index is not None else torch.cuda.current_device()
        args.stream = torch.cuda.current_stream(q.device).cuda_stream
        ext.rope_cuda(args)
    elif q.device.type == "cpu":
        ext.rope_host(args)
    else:
        raise ValueError(f"q: the extension takes CUDA or CPU tensors, got {q.device}")
