"""Launch configurations of the Triton kernels: one table per kernel, keyed by GPU family x dtype x head_dim.

Like flash-attention's `kernel_traits.h`, each shape class gets its own tile sizes, warps and pipeline stages instead
of one configuration for every shape. Every entry is compiled for its family's GPUs in CI (tests/triton_aot.py):
within the family's shared memory per block and without a single register spill (`ptxas -v`), and
benchmarks/static_analysis.py records what the compiler made of the main ones.

Families, by the shared memory one block may opt into:
- "sm80": A100 / A30, Jetson Orin (sm_80, sm_87): 163 KB
- "sm86": consumer and workstation Ampere/Ada/Blackwell (sm_86, sm_89, sm_120, sm_121), and unknown GPUs: 99 KB
- "sm90": H100/H200 and B200/GB200 (sm_90, sm_100, sm_103): 227 KB
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

SHARED_MEMORY_PER_BLOCK = {"sm80": 163 * 1024, "sm86": 99 * 1024, "sm90": 227 * 1024}


@dataclasses.dataclass(frozen=True)
class Config:
    block_m: int  # query rows per tile (RoPE: tokens per program)
    block_n: int  # key rows per tile (RoPE: heads per inner step)
    num_warps: int
    num_stages: int
    maxnreg: int | None = None  # register cap per thread (None: ptxas decides, up to 255)


def family(capability: tuple[int, int]) -> str:
    """The shared-memory family of a CUDA compute capability."""
    if capability in ((8, 0), (8, 7)):
        return "sm80"
    if capability[0] in (9, 10):
        return "sm90"
    return "sm86"


# Tiles of the CPU interpreter: small, so tests stay fast; the arithmetic is the same at any tile size.
INTERPRETER = Config(16, 16, 4, 1)

# (kernel, family, "16" for fp16/bf16 or "32" for fp32, padded head_dim) -> Config. The padded head_dim is the next
# power of two (80 and 96 run as 128 with masked columns). fp32 dots are exact fp32 ("ieee", FMA units, no tensor
# cores), whose operands and accumulators live in registers: much smaller tiles.
_ATTENTION = {
    # forward: Q tile [BM, D] resident, K/V tiles [BN, D] streamed through `num_stages` buffers
    ("fwd", "sm90", "16", 64): Config(128, 64, 4, 3),
    ("fwd", "sm90", "16", 128): Config(64, 64, 4, 3),
    ("fwd", "sm90", "16", 256): Config(64, 64, 8, 2),
    ("fwd", "sm80", "16", 64): Config(64, 64, 4, 3),
    ("fwd", "sm80", "16", 128): Config(64, 64, 8, 3),
    ("fwd", "sm80", "16", 256): Config(64, 32, 8, 2),
    ("fwd", "sm86", "16", 64): Config(64, 64, 4, 3),
    ("fwd", "sm86", "16", 128): Config(64, 64, 8, 2),
    ("fwd", "sm86", "16", 256): Config(64, 32, 8, 1),
    # dQ: Q, dO tiles [BM, D] resident with the fp32 dQ accumulator; K, V tiles [BN, D] streamed
    ("dq", "sm90", "16", 64): Config(64, 64, 4, 2),
    ("dq", "sm90", "16", 128): Config(64, 64, 8, 2),
    ("dq", "sm90", "16", 256): Config(64, 32, 8, 2),
    ("dq", "sm80", "16", 64): Config(64, 64, 4, 2),
    ("dq", "sm80", "16", 128): Config(64, 64, 8, 2),
    ("dq", "sm80", "16", 256): Config(64, 32, 8, 2),
    ("dq", "sm86", "16", 64): Config(64, 64, 4, 2),
    ("dq", "sm86", "16", 128): Config(64, 32, 8, 2),
    ("dq", "sm86", "16", 256): Config(32, 32, 8, 1),
    # dK/dV: K, V tiles [BN, D] resident with their two fp32 accumulators; Q, dO tiles [BM, D] streamed
    ("dkdv", "sm90", "16", 64): Config(64, 64, 4, 2),
    ("dkdv", "sm90", "16", 128): Config(64, 64, 8, 2),
    ("dkdv", "sm90", "16", 256): Config(32, 32, 8, 2),
    ("dkdv", "sm80", "16", 64): Config(64, 64, 4, 2),
    ("dkdv", "sm80", "16", 128): Config(64, 64, 8, 2),
    ("dkdv", "sm80", "16", 256): Config(32, 32, 8, 2),
    ("dkdv", "sm86", "16", 64): Config(64, 64, 4, 2),
    ("dkdv", "sm86", "16", 128): Config(32, 64, 8, 2),
    ("dkdv", "sm86", "16", 256): Config(32, 32, 8, 1),
}
for _family in SHARED_MEMORY_PER_BLOCK:
    for _kernel in ("fwd", "dkdv", "dq"):
        _ATTENTION[(_kernel, _family, "32", 64)] = Config(32, 32, 4, 2)
        _ATTENTION[(_kernel, _family, "32", 128)] = Config(32, 32, 4, 2)
        _ATTENTION[(_kernel, _family, "32", 256)] = Config(16, 16, 4, 2)


def attention_config(kernel: str, head_dim: int, dtype: torch.dtype, capability: tuple[int, int] | None) -> Config:
    """Launch configuration of the attention kernel `kernel` ("fwd", "dkdv", "dq") for q's head_dim and dtype on a
    GPU of compute capability `capability` (None: the CPU interpreter)."""
    if capability is None:
        return INTERPRETER
    padded = max(64, 1 << (head_dim - 1).bit_length())
    return _ATTENTION[(kernel, family(capability), "32" if dtype == torch.float32 else "16", padded)]


def rope_config(pairs: int, n_heads: int) -> Config:
    """Tokens per program (block_m) and heads per step (block_n) of the RoPE kernel for `pairs` (rotary_dim / 2,
    rounded up to a power of two) and the larger of the q / k head counts, on every GPU family (no shared memory;
    bandwidth-bound). ~4K pairs in flight per step: enough bytes per program to stream at full bandwidth, and (fp32
    cos/sin of block_m x pairs resident) no spills."""
    block_h = max(1, min(1 << (n_heads - 1).bit_length(), 1024 // pairs))
    return Config(max(1, min(16, 4096 // (pairs * block_h))), block_h, 4, 1)


def capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability of a CUDA device; None for the CPU interpreter."""
    return None if device.type == "cpu" else torch.cuda.get_device_capability(device)


def device_guard(x: torch.Tensor):
    """Launch on x's GPU, whatever the current device is."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
