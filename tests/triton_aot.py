"""Ahead-of-time compilation of every Triton kernel for NVIDIA GPUs, without one (run by test_triton_compile.py).

CI runs the kernels in Triton's CPU interpreter, which is more lenient than the compiler (it accepts non-constexpr
globals, dtype mismatches in dots, ...). Here the launchers run on meta tensors with `JITFunction.run` replaced by a
recorder, so each kernel is compiled with exactly the arguments and compile-time constants a GPU launch would get
(GPU tile sizes included), down to a cubin, and its shared memory is checked against the GPU's limit.

Must run in a process where TRITON_INTERPRET is unset (the interpreter replaces `triton.jit` at import time):

    python tests/triton_aot.py 90     # prints {case: error or ""} as JSON
"""

from __future__ import annotations

import inspect
import json
import sys
import traceback

import torch

POINTER_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32",
                 torch.int64: "*i64"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}  # opt-in bytes per block: A100, H100, B200

ROPE_CASES = {  # name: (dtype, head_dim, rotary_dim, interleaved, conjugate, exact, with_k)
    "rope bf16 half-split": (torch.bfloat16, 128, 128, False, False, True, True),
    "rope fp16 interleaved backward": (torch.float16, 64, 64, True, True, True, True),
    "rope fp32 partial q-only": (torch.float32, 128, 64, False, False, True, False),
    "rope bf16 fp32-product": (torch.bfloat16, 128, 128, False, False, False, True),
}
ATTENTION_CASES = {  # name: (dtype, head_dim, rotary_dim, interleaved, causal, varlen); forward + both backward
    "attention bf16 d128 causal": (torch.bfloat16, 128, 128, False, True, False),
    "attention fp16 d64 interleaved packed": (torch.float16, 64, 64, True, True, True),
    "attention bf16 d128 partial non-causal": (torch.bfloat16, 128, 64, False, False, False),
    "attention fp32 d64": (torch.float32, 64, 64, False, True, False),
}
CASES = sorted(ROPE_CASES) + sorted(ATTENTION_CASES)


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _rope_launch(case):
    from ctxext_kernels.ops import triton_rope

    dtype, head_dim, rotary_dim, interleaved, conjugate, exact, with_k = ROPE_CASES[case]
    q, k = _meta(2, 16, 32, head_dim, dtype=dtype), _meta(2, 16, 8, head_dim, dtype=dtype) if with_k else None
    out_q, out_k = torch.empty_like(q), None if k is None else torch.empty_like(k)
    positions, inv_freq = _meta(2, 16, dtype=torch.int64), _meta(rotary_dim // 2, dtype=torch.float32)
    triton_rope.rope_forward(q, k, out_q, out_k, positions, inv_freq, 1.0, interleaved, conjugate, exact)


def _attention_launch(case):
    from ctxext_kernels.ops import triton_attention

    dtype, head_dim, rotary_dim, interleaved, causal, varlen = ATTENTION_CASES[case]
    batch = 1 if varlen else 2
    q, k = _meta(batch, 64, 8, head_dim, dtype=dtype), _meta(batch, 64, 2, head_dim, dtype=dtype)
    v, out, lse = torch.empty_like(k), torch.empty_like(q), _meta(batch, 64, 8, dtype=torch.float32)
    positions, inv_freq = _meta(batch, 64, dtype=torch.int64), _meta(rotary_dim // 2, dtype=torch.float32)
    cu_seqlens = torch.tensor([0, 20, 64], dtype=torch.int32) if varlen else None
    flags = dict(scaling=1.0, softmax_scale=head_dim ** -0.5, causal=causal, interleaved=interleaved, exact=True)
    triton_attention.attention_forward(q, k, v, out, lse, positions, inv_freq, cu_seqlens, **flags)
    grads = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    triton_attention.attention_backward(torch.empty_like(q), q, k, v, out, lse, *grads, positions, inv_freq,
                                        cu_seqlens, **flags)


def _signature_of(value) -> str:
    if isinstance(value, torch.Tensor):
        return POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


def compile_case(case: str, arch: int) -> None:
    """Record the case's launches, compile each for sm_<arch>; raises on any failure."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    launches = []
    original_run = JITFunction.run
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: launches.append((self, args, kwargs))
    try:
        (_rope_launch if case in ROPE_CASES else _attention_launch)(case)
    finally:
        JITFunction.run = original_run
    if not launches:
        raise AssertionError("the launcher launched nothing")
    for kernel, args, kwargs in launches:
        names = list(inspect.signature(kernel.fn).parameters)
        constexprs = {name: value for name, value in kwargs.items() if name not in LAUNCH_OPTIONS}
        positional = dict(zip(names, args))
        missing = [name for name in names if name not in positional and name not in constexprs]
        if missing:
            raise AssertionError(f"{kernel.fn.__name__}: the launch leaves {missing} unset")
        signature = {name: "constexpr" if name in constexprs else _signature_of(positional[name]) for name in names}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={name: kwargs[name] for name in LAUNCH_OPTIONS if name in kwargs})
        if not compiled.asm.get("cubin"):
            raise AssertionError(f"{kernel.fn.__name__}: no cubin")
        if compiled.metadata.shared > SHARED_MEMORY_LIMIT[arch]:
            raise AssertionError(f"{kernel.fn.__name__} needs {compiled.metadata.shared} bytes of shared memory, "
                                 f"sm_{arch} allows {SHARED_MEMORY_LIMIT[arch]}")


def main(arch: int) -> dict[str, str]:
    errors = {}
    for case in CASES:
        try:
            compile_case(case, arch)
            errors[case] = ""
        except Exception:  # noqa: BLE001 - every failure is reported, with its traceback, per case
            errors[case] = traceback.format_exc(limit=-3)
    return errors


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]))))
