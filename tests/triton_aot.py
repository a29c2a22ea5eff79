"""Ahead-of-time compilation of every Triton kernel for NVIDIA GPUs, without one (run by test_triton_compile.py).

CI runs the kernels in Triton's CPU interpreter, which is more lenient than the compiler (it accepts non-constexpr
globals, dtype mismatches in dots, ...) and says nothing about registers or shared memory. Here the launchers run on
meta tensors with `JITFunction.run` replaced by a recorder and the GPU's compute capability patched in, so each
kernel is compiled with exactly the arguments, compile-time constants and launch configuration (tile sizes, warps,
stages: `ops/triton_configs.py`) a launch on that GPU would get, down to a cubin. A kernel fails when it
- needs more shared memory than one block of that GPU family may have, or
- spills registers: `ptxas -v` reports spill stores/loads (fresh compiles), or its SASS touches local memory
  (`LDL`/`STL`) or it has a stack frame (`cuobjdump -res-usage`; these two also cover kernels that Triton's cache
  serves without running ptxas). A configuration a GPU measurement chose although it spills carries a
  `stack_budget` (ops/triton_configs.py): its stack frame may not grow beyond it.

The matrix: the attention kernels (forward, dQ, dK/dV) for every head_dim 64/80/96/128/256 x fp16/bf16 and
64/80/96/128 x fp32 (what the Triton backend takes), each
with one combination of the code-shaping flags (causal, packed, interleaved, partial rotary; together every flag is
covered), and the RoPE kernel's variants; for sm_80 (A100), sm_86 (99 KB family), sm_90 (H100) and sm_100 (B200).

Must run in a process where TRITON_INTERPRET is unset (the interpreter replaces `triton.jit` at import time):

    python tests/triton_aot.py 90 [CASE ...]    # prints {case: error or ""} as JSON
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch

ARCHS = (80, 86, 90, 100)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    dtype: str
    head_dim: int
    causal: bool = True
    varlen: bool = False
    interleaved: bool = False
    partial: bool = False  # rotary_dim = head_dim / 2
    leftpad: bool = False  # per-row key starts (padded batches, static caches)

    def __str__(self):
        flags = [name for name in ("varlen", "interleaved", "partial", "leftpad") if getattr(self, name)]
        return " ".join(["attention", self.dtype, f"d{self.head_dim}", "causal" if self.causal else "full", *flags])


# Flag combinations cycled over the (dtype, head_dim) matrix: tile configurations depend on dtype x head_dim only,
# the flags change the code inside the tiles, so each flag meets several sizes and every size some flags.
_FLAG_CYCLE = (dict(), dict(varlen=True, interleaved=True), dict(causal=False, partial=True),
               dict(varlen=True, partial=True), dict(causal=False, interleaved=True))
ATTENTION_CASES = {str(c): c for c in (
    *(AttentionCase(dtype, head_dim, **_FLAG_CYCLE[(i + j) % len(_FLAG_CYCLE)])
      for i, dtype in enumerate(DTYPES) for j, head_dim in enumerate((64, 80, 96, 128, 256))
      if dtype != "fp32" or head_dim <= 128),  # fp32 stops at 128 (see ops/triton_configs.py)
    AttentionCase("bf16", 128),  # and the most common shape as it is (Llama, Mistral, Qwen: no flag)
    # combinations that once spilled on sm_100 while the cycle's passed (a sweep of all 16 flag combinations)
    AttentionCase("bf16", 64, partial=True), AttentionCase("bf16", 256, varlen=True),
    # batched generation from left-padded prompts (the ctxext attention backend's padding masks)
    AttentionCase("bf16", 128, leftpad=True), AttentionCase("fp16", 64, causal=False, leftpad=True))}
ROPE_CASES = {  # name: (dtype, head_dim, rotary_dim, interleaved, conjugate, exact, with_k)
    "rope bf16 half-split": (torch.bfloat16, 128, 128, False, False, True, True),
    "rope fp16 interleaved backward": (torch.float16, 64, 64, True, True, True, True),
    "rope fp32 partial q-only": (torch.float32, 128, 64, False, False, True, False),
    "rope bf16 fp32-product": (torch.bfloat16, 128, 128, False, False, False, True),
    "rope bf16 d256 keys-only": (torch.bfloat16, 256, 256, False, False, True, False),
}
CASES = sorted(ROPE_CASES) + sorted(ATTENTION_CASES)


def shared_memory_limit(arch: int) -> int:
    from ctxext_kernels.ops import triton_configs

    return triton_configs.SHARED_MEMORY_PER_BLOCK[triton_configs.family(divmod(arch, 10))]


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _rope_launch(case):
    from ctxext_kernels.ops import triton_rope

    dtype, head_dim, rotary_dim, interleaved, conjugate, exact, with_k = ROPE_CASES[case]
    q, k = _meta(2, 16, 32, head_dim, dtype=dtype), _meta(2, 16, 8, head_dim, dtype=dtype) if with_k else None
    out_q, out_k = torch.empty_like(q), None if k is None else torch.empty_like(k)
    positions, inv_freq = _meta(2, 16, dtype=torch.int64), _meta(rotary_dim // 2, dtype=torch.float32)
    triton_rope.rope_forward(q, k, out_q, out_k, positions, inv_freq, 1.0, interleaved, conjugate, exact)


def attention_launch(case: AttentionCase, kernels=("fwd", "dq", "dkdv"), rotate: bool = True):
    """The launches of one attention case: the forward and the two backward kernels, on canonical meta views."""
    from ctxext_kernels.ops import triton_attention

    dtype, head_dim = DTYPES[case.dtype], case.head_dim
    batch = 1 if case.varlen else 2
    q, k = _meta(batch, 64, 8, head_dim, dtype=dtype), _meta(batch, 64, 2, head_dim, dtype=dtype)
    v, out, lse = torch.empty_like(k), torch.empty_like(q), _meta(batch, 64, 8, dtype=torch.float32)
    rotary_dim = head_dim // 2 if case.partial else head_dim
    positions, inv_freq = _meta(batch, 64, dtype=torch.int64), _meta(rotary_dim // 2, dtype=torch.float32)
    cu_seqlens = torch.tensor([0, 20, 64], dtype=torch.int32) if case.varlen else None
    flags = dict(scaling=1.0, softmax_scale=head_dim ** -0.5, causal=case.causal, interleaved=case.interleaved,
                 exact=True, rotate=rotate, k_leftpad=torch.zeros(batch, dtype=torch.int32) if case.leftpad else None)
    if "fwd" in kernels:
        triton_attention.attention_forward(q, k, v, out, lse, positions, inv_freq, cu_seqlens, cu_seqlens, **flags)
    if "dq" in kernels or "dkdv" in kernels:
        grads = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        triton_attention.attention_backward(torch.empty_like(q), q, k, v, out, lse, *grads, positions, inv_freq,
                                            cu_seqlens, cu_seqlens, **flags)


def record(launch, arch: int) -> list:
    """(kernel, args, kwargs) of every Triton launch `launch()` makes, for a GPU of sm_<arch>."""
    from triton.runtime.jit import JITFunction

    from ctxext_kernels.ops import triton_configs

    launches = []
    patches = ((JITFunction, "run", lambda self, *args, grid, warmup, **kwargs: launches.append((self, args, kwargs))),
               (triton_configs, "capability", lambda device: divmod(arch, 10)))
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        launch()
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
    if not launches:
        raise AssertionError("the launcher launched nothing")
    return launches


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def cuobjdump(cubin: bytes, *flags: str) -> str:
    """`cuobjdump <flags>` of a cubin (the one bundled with Triton)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), *flags, f.name], check=True, capture_output=True,
                              text=True).stdout


def compile_launch(kernel, args, kwargs, arch: int) -> dict:
    """Compile one recorded launch for sm_<arch>, specialised exactly as `JITFunction.run` would (integer arguments
    divisible by 16 or equal to 1, pointer alignment); its resources: name, shared bytes, registers and spill bytes
    (from ptxas -v when it ran, else None), local-memory instructions in the SASS, the SASS, the compiled kernel and the
    launch's keyword arguments (compile-time constants, warps, stages)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    log = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    cubin = compiled.asm.get("cubin")
    if not cubin:
        raise AssertionError(f"{kernel.fn.__name__}: no cubin")
    code = cuobjdump(cubin, "-sass")
    usage = re.search(r"REG:(\d+) STACK:(\d+)", cuobjdump(cubin, "-res-usage"))
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    return dict(name=kernel.fn.__name__, shared=compiled.metadata.shared, registers=int(usage.group(1)),
                stack=int(usage.group(2)), spill_bytes=sum(int(a) + int(b) for a, b in spills) if spills else None,
                local_ops=len(re.findall(r"\b(?:LDL|STL)\b", code)), num_warps=compiled.metadata.num_warps,
                sass=code, compiled=compiled, launch=kwargs)


ATTENTION_KERNELS = {"_fwd_kernel": "fwd", "_bwd_dq_kernel": "dq", "_bwd_dkdv_kernel": "dkdv"}


def stack_budget(kernel_name: str, case: AttentionCase | None, arch: int) -> int:
    """The stack frame a compiled kernel may have on sm_<arch>: its configuration's `stack_budget`
    (ops/triton_configs.py: non-zero only where a GPU measurement chose a spilling configuration), else 0."""
    from ctxext_kernels.ops import triton_configs

    if case is None or kernel_name not in ATTENTION_KERNELS:
        return 0
    return triton_configs.attention_config(ATTENTION_KERNELS[kernel_name], case.head_dim, DTYPES[case.dtype],
                                           divmod(arch, 10)).stack_budget


def check(report: dict, arch: int, budget: int = 0) -> str:
    """Why a compiled kernel is not acceptable on sm_<arch> ("" when it is): over the family's shared memory, or any
    spill -- beyond a stack frame of `budget` bytes where its configuration has one (`stack_budget`)."""
    problems = []
    if report["shared"] > shared_memory_limit(arch):
        problems.append(f"needs {report['shared']} bytes of shared memory, sm_{arch} allows "
                        f"{shared_memory_limit(arch)}")
    if budget:
        if report["stack"] > budget:
            problems.append(f"{report['stack']}-byte stack frame, over the {budget} bytes its measured "
                            "configuration is allowed")
    else:
        if report["spill_bytes"]:
            problems.append(f"spills {report['spill_bytes']} bytes (ptxas -v)")
        if report["local_ops"] or report["stack"]:
            problems.append(f"{report['local_ops']} local-memory instructions (LDL/STL) in its SASS, "
                            f"{report['stack']}-byte stack frame")
    return f"{report['name']}: " + "; ".join(problems) if problems else ""


def compile_case(case: str, arch: int) -> list[dict]:
    """Record the case's launches, compile each for sm_<arch>; raises on any failure."""
    launch = (lambda: _rope_launch(case)) if case in ROPE_CASES else (lambda: attention_launch(ATTENTION_CASES[case]))
    reports = [compile_launch(*launched, arch) for launched in record(launch, arch)]
    errors = [error for error in (check(report, arch, stack_budget(report["name"], ATTENTION_CASES.get(case), arch))
                                  for report in reports) if error]
    if errors:
        raise AssertionError("; ".join(errors))
    return reports


def main(arch: int, cases=CASES) -> dict[str, str]:
    errors = {}
    for case in cases:
        try:
            compile_case(case, arch)
            errors[case] = ""
        except Exception:  # noqa: BLE001 - every failure is reported, with its traceback, per case
            errors[case] = traceback.format_exc(limit=-3)
    return errors


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), sys.argv[2:] or CASES)))
