"""What can be checked of the CUDA fused attention without a GPU: its compiled code for every arch the module was
built for, and the launchers' argument checks.

csrc/attention/ is FlashAttention-2 in hand-written PTX, and the SASS must show it: tensor-core HMMA.16816 fed by
LDSM (ldmatrix) in every kernel, LDGSTS (cp.async) tile copies, no generic LD/ST (a shared tile reached through a
generic pointer -- what the earlier WMMA kernels' bf16 fragment loads compiled to), no local memory (register spills or
a stack frame), and the RoPE of the forward and dQ kernels on the hardware sin/cos (MUFU.SIN/COS). Whether the kernels
compute the right thing needs a GPU: tests/test_rope_attention.py's GPU tests.

`python tests/test_cuda_attention_static.py` prints the per-kernel table of benchmarks/results/static/cuda_attention.md.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

try:
    _C = importlib.import_module("ctxext_kernels._C")
except ImportError as exc:
    if os.environ.get("CTXEXT_REQUIRE_HOST_BUILD") == "1":
        raise
    pytest.skip(f"ctxext_kernels._C is not built ({exc})", allow_module_level=True)

if not getattr(_C, "has_attention", False):
    pytest.skip("ctxext_kernels._C was built without the CUDA attention kernels", allow_module_level=True)

KINDS = ("forward", "dkdv", "dq")
DTYPES = ("Half", "BFloat16")
HEAD_DIMS = (64, 128)
_NAME = re.compile(r"(forward|dkdv|dq)_kernelINS_\d+(Half|BFloat16)ELi(\d+)E")
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


@dataclasses.dataclass
class Kernel:
    registers: int = -1
    stack: int = -1
    local: int = -1
    ops: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # full opcode -> count

    def count(self, prefix: str) -> int:
        """Instructions whose opcode is `prefix` or starts with `prefix.`."""
        return sum(n for op, n in self.ops.items() if op == prefix or op.startswith(prefix + "."))


def _cuobjdump() -> str | None:
    """cuobjdump from PATH, next to nvcc, or the copy Triton ships."""
    candidates = [shutil.which("cuobjdump")]
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        candidates.append(root and os.path.join(root, "bin", "cuobjdump"))
    triton = importlib.util.find_spec("triton")
    if triton and triton.origin:
        candidates.append(str(Path(triton.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _parse(text: str, kernels: dict, arch: str) -> None:
    """Fill `kernels[(arch, kind, dtype, head_dim)]` from cuobjdump -res-usage / -sass output of one cubin."""
    current = None
    for line in text.splitlines():
        if "Function" in line:
            match = _NAME.search(line)
            current = None
            if match:
                current = kernels.setdefault((arch, match[1], match[2], int(match[3])), Kernel())
            continue
        if current is None:
            continue
        usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", line)
        if usage:
            current.registers, current.stack, current.local = map(int, usage.groups())
        instruction = _INSTRUCTION.search(line)
        if instruction and instruction[1] != "@!PT ":  # "@!PT" instructions never run (scheduling filler)
            current.ops[instruction[2]] += 1


@functools.cache
def _kernels() -> dict:
    """(arch, kind, dtype, head_dim) -> Kernel, for the attention cubins inside the built module."""
    if not _C.has_cuda:
        pytest.skip("ctxext_kernels._C was built without CUDA")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton) to read the compiled kernels")
    kernels: dict = {}
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([tool, "-xelf", "attention_kernels", _C.__file__], cwd=folder, check=True, capture_output=True)
        for cubin in sorted(Path(folder).glob("*.cubin")):
            arch = re.search(r"sm_(\d+[af]?)", cubin.name)[1]
            for flag in ("-res-usage", "-sass"):
                out = subprocess.run([tool, flag, str(cubin)], check=True, capture_output=True, text=True).stdout
                _parse(out, kernels, arch)
    return kernels


def test_every_built_arch_has_every_kernel():
    built = {(arch, kind, dtype, dim) for arch, kind, dtype, dim in _kernels()}
    want = {(arch, kind, dtype, dim) for arch in _C.cuda_archs for kind in KINDS for dtype in DTYPES
            for dim in HEAD_DIMS}
    assert built == want


def test_no_local_memory_no_spills():
    for key, kernel in _kernels().items():
        assert 0 < kernel.registers <= 255, key
        assert kernel.stack == 0 and kernel.local == 0, f"{key}: stack {kernel.stack}, local {kernel.local}"
        assert kernel.count("LDL") == kernel.count("STL") == 0, key


def test_tensor_cores_fed_by_ldmatrix_and_cp_async():
    for (arch, kind, dtype, dim), kernel in _kernels().items():
        key = (arch, kind, dtype, dim)
        mma = "HMMA.16816.F32.BF16" if dtype == "BFloat16" else "HMMA.16816.F32"
        assert kernel.ops[mma] > 0 and kernel.count("HMMA") == kernel.ops[mma], (key, kernel.ops)
        assert kernel.count("LDSM") > 0 and kernel.count("LDGSTS") > 0, (key, kernel.ops)
        # Shared tiles through generic pointers would show as LD/ST (LDS/STS/LDG/STG are the typed forms).
        assert kernel.count("LD") == kernel.count("ST") == 0, (key, kernel.ops)


def test_rope_uses_the_hardware_sin_cos():
    """The forward kernel rotates Q and the dQ kernel rotates dQ back with MUFU.SIN/COS on the exactly reduced
    angle (no precise-sinf slow path); the dK/dV kernel does no trig at all."""
    for (arch, kind, dtype, dim), kernel in _kernels().items():
        trig = kernel.ops["MUFU.SIN"] + kernel.ops["MUFU.COS"]
        if kind == "dkdv":
            assert trig == 0, (arch, kind, dtype, dim)
        else:
            assert kernel.ops["MUFU.SIN"] > 0 and kernel.ops["MUFU.COS"] > 0, (arch, kind, dtype, dim)


# ------------------------------------------------------------------------------------------ launcher checks
def _view(shape, data=1 << 20, strides=None):
    """A TensorView that is never dereferenced: every case below fails validation before anything launches."""
    if strides is None:
        strides = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            strides[i] = strides[i + 1] * shape[i + 1]
    return _C.TensorView(data, list(shape), strides)


def _args(sq=16, sk=16, d=64, **views):
    args = _C.AttentionArgs()
    shapes = {"q": [1, sq, 2, d], "k": [1, sk, 1, d], "v": [1, sk, 1, d], "out": [1, sq, 2, d], "lse": [1, sq, 2],
              "positions": [1, sq], "inv_freq": [d // 2]}
    for name, shape in shapes.items():
        setattr(args, name, views.get(name, _view(shape)))
    args.dtype, args.max_seqlen_q, args.max_seqlen_k = _C.DType.bfloat16, sq, sk
    return args


BAD_ARGS = [
    ("float32", lambda: _set(_args(), dtype=_C.DType.float32), "dtype: the CUDA kernels take float16/bfloat16"),
    ("head_dim 96", lambda: _args(d=96), "q: head_dim must be 64 or 128"),
    ("fewer keys than queries", lambda: _args(sq=16, sk=8), "k: needs at least as many keys as queries"),
    ("v length", lambda: _args(v=_view([1, 12, 1, 64])), "v: dim 1 is 12, expected 16"),
    ("rows not 16-byte aligned", lambda: _args(q=_view([1, 16, 2, 64], strides=[2052, 130, 64, 1])),
     "q: strides must be multiples of 8 elements"),
    ("data not 16-byte aligned", lambda: _args(k=_view([1, 16, 1, 64], data=(1 << 20) + 2)),
     "k: the data pointer must be 16-byte aligned"),
    ("head dim strided", lambda: _args(v=_view([1, 16, 1, 64], strides=[2048, 128, 128, 2])),
     "v: the head dimension must be contiguous"),
    ("cu_seqlens alone", lambda: _set(_args(), cu_seqlens=_view([3])), "cu_seqlens_k: give cu_seqlens and"),
    ("max_seqlen_k", lambda: _set(_args(), max_seqlen_k=17), "max_seqlen_k: must lie in"),
]


def _set(args, **fields):
    for name, value in fields.items():
        setattr(args, name, value)
    return args


@pytest.mark.parametrize("what,make,message", BAD_ARGS, ids=[b[0] for b in BAD_ARGS])
@pytest.mark.parametrize("launcher", ["rope_attention_forward_cuda", "rope_attention_backward_cuda"])
def test_launchers_name_the_bad_argument(what, make, message, launcher):
    with pytest.raises(ValueError, match=re.escape(message)):
        getattr(_C, launcher)(make())


def test_backward_checks_its_own_tensors():
    args = _set(_args(), grad_out=_view([1, 16, 2, 64]), delta=_view([1, 16, 2]), grad_q=_view([1, 16, 2, 64]),
                grad_k=_view([1, 16, 1, 64]), grad_v=_view([1, 16, 1, 64], data=(1 << 20) + 8))
    with pytest.raises(ValueError, match="grad_v: the data pointer must be 16-byte aligned"):
        _C.rope_attention_backward_cuda(args)


# ------------------------------------------------------------------------------------------------ the table
def _table() -> str:
    """Markdown: per arch and kernel, registers, stack, and the instruction mix."""
    columns = ["HMMA", "LDSM", "LDGSTS", "LDS", "STS", "LDG", "STG", "MUFU.EX2", "MUFU.SIN", "MUFU.COS", "SHFL", "BAR"]
    lines = ["| arch | kernel | registers | stack + local bytes | instructions | " + " | ".join(columns) + " |",
             "|---" * (5 + len(columns)) + "|"]
    kernels = _kernels()
    order = {kind: i for i, kind in enumerate(KINDS)}
    for (arch, kind, dtype, dim) in sorted(kernels, key=lambda k: (int(re.sub(r"\D", "", k[0])), order[k[1]],
                                                                   k[3], k[2])):
        kernel = kernels[(arch, kind, dtype, dim)]
        counts = [kernel.ops[c] if "." in c else kernel.count(c) for c in columns]
        lines.append(f"| sm_{arch} | {kind}<{dtype}, {dim}> | {kernel.registers} | {kernel.stack + kernel.local} | "
                     f"{sum(kernel.ops.values())} | " + " | ".join(map(str, counts)) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(_table())
