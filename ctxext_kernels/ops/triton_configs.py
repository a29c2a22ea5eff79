"""Launch configurations of the Triton kernels: one table per kernel, keyed by GPU family x dtype x head_dim.

Like flash-attention's `kernel_traits.h`, each shape class gets its own tile sizes, warps and pipeline stages instead
of one configuration for every shape. Every entry is compiled for its family's GPUs in CI (tests/triton_aot.py):
within the family's shared memory per block and without a single register spill (`ptxas -v`), and
benchmarks/static_analysis.py records what the compiler made of the main ones.

Families, by the shared memory one block may opt into:
- "sm80": A100 / A30, Jetson Orin (sm_80, sm_87): 163 KB
- "sm86": consumer and workstation Ampere/Ada/Blackwell (sm_86, sm_89, sm_120, sm_121), and unknown GPUs: 99 KB
- "sm90": H100/H200 (sm_90): 227 KB
- "sm100": B200/GB200/B300 (sm_100, sm_103): 227 KB; tcgen05 MMAs, its own register needs
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

SHARED_MEMORY_PER_BLOCK = {"sm80": 163 * 1024, "sm86": 99 * 1024, "sm90": 227 * 1024, "sm100": 227 * 1024}


@dataclasses.dataclass(frozen=True)
class Config:
    block_m: int  # query rows per tile (RoPE: tokens per program)
    block_n: int  # key rows per tile (RoPE: heads per inner step)
    num_warps: int
    num_stages: int
    gathered_block_m: int | None = None  # block_m when the rotation gathers cos/sin (None: half of block_m)
    # Bytes of stack frame (spilled registers) CI accepts for this entry: 0, except where a GPU measurement found the
    # spilling configuration faster than every spill-free candidate (then the largest frame over the flag combinations)
    stack_budget: int = 0


def family(capability: tuple[int, int]) -> str:
    """The configuration family of a CUDA compute capability."""
    if capability in ((8, 0), (8, 7)):
        return "sm80"
    if capability[0] == 9:
        return "sm90"
    if capability[0] == 10:
        return "sm100"
    return "sm86"


# Tiles of the CPU interpreter: small, so tests stay fast; the arithmetic is the same at any tile size.
INTERPRETER = Config(16, 16, 4, 1)

# (kernel, family, "16" for fp16/bf16 or "32" for fp32, padded head_dim) -> Config. The padded head_dim is the next
# power of two (80 and 96 run as 128 with masked columns). Chosen by compiling candidates for each family (largest
# tiles first) and keeping the first without spills within the family's shared memory; sm_90's forward at 128 keeps
# two blocks per SM (4 warps, <= 255 registers, <= 113 KB). fp32 dots are exact fp32 ("ieee": FMA units, no tensor
# cores), whose operands live in registers: much smaller tiles.
_ATTENTION = {
    # forward: Q tile [BM, D] resident, K/V tiles [BN, D] streamed through `num_stages` buffers
    ("fwd", "sm90", "16", 64): Config(128, 64, 4, 3),
    ("fwd", "sm90", "16", 128): Config(64, 64, 4, 3),
    # 256 on sm_90: 32-row tiles with or without the gather (64 rows spill without it, 16 rows with it)
    ("fwd", "sm90", "16", 256): Config(32, 64, 8, 1, gathered_block_m=32),
    ("fwd", "sm80", "16", 64): Config(64, 64, 4, 3),
    ("fwd", "sm80", "16", 128): Config(64, 64, 8, 3),
    ("fwd", "sm80", "16", 256): Config(64, 32, 8, 2),  # 64-key tiles spill 112 bytes on packed sequences
    ("fwd", "sm86", "16", 64): Config(64, 64, 4, 3),
    ("fwd", "sm86", "16", 128): Config(64, 64, 8, 2),
    ("fwd", "sm86", "16", 256): Config(64, 32, 8, 1),
    # sm_100 sits at the register limit: spill-free for every combination of causal / packed / interleaved / partial
    # rotary (3-stage 64-key tiles spilled 8-32 bytes at 64 and 128 with a gathered rotation, and 2 stages at 256
    # spilled 144-256 bytes on packed sequences)
    ("fwd", "sm100", "16", 64): Config(64, 64, 4, 2),
    ("fwd", "sm100", "16", 128): Config(64, 32, 8, 3),
    ("fwd", "sm100", "16", 256): Config(64, 64, 8, 1),
    # dQ: Q, dO tiles [BM, D] resident with the fp32 dQ accumulator; K, V tiles [BN, D] streamed
    ("dq", "sm90", "16", 64): Config(64, 64, 4, 2),
    # sm_90 backward at 128: one warpgroup per 64-row tile spills (dQ up to 104 stack bytes, dK/dV up to 320 over the
    # flag combinations) yet measured fastest on an H200, causal 2 x 8k, GQA 32/8 (benchmarks/tune_attention.py ->
    # benchmarks/results/nvidia-h200/tuned/): backward 16.2 and 12.5 ms with one kernel tuned vs 20.4 ms with the
    # spill-free (64, 64, 8, 2) / (32, 64, 8, 2); both tuned: fwd+bwd 11.5 ms vs 23.0
    ("dq", "sm90", "16", 128): Config(64, 64, 4, 2, stack_budget=104),
    ("dq", "sm90", "16", 256): Config(64, 16, 8, 2),  # 32-key tiles spill 8-32 bytes on packed sequences
    ("dq", "sm80", "16", 64): Config(64, 32, 4, 2),
    ("dq", "sm80", "16", 128): Config(64, 64, 8, 2),
    ("dq", "sm80", "16", 256): Config(64, 32, 8, 2),
    ("dq", "sm86", "16", 64): Config(64, 32, 4, 2),
    ("dq", "sm86", "16", 128): Config(64, 64, 8, 2),
    ("dq", "sm86", "16", 256): Config(64, 32, 8, 1),
    # dK/dV: K, V tiles [BN, D] resident with their two fp32 accumulators; Q, dO tiles [BM, D] streamed
    ("dkdv", "sm90", "16", 64): Config(32, 64, 4, 2),
    ("dkdv", "sm90", "16", 128): Config(64, 64, 4, 2, stack_budget=320),
    ("dkdv", "sm90", "16", 256): Config(32, 32, 8, 1),
    ("dkdv", "sm80", "16", 64): Config(32, 64, 8, 2),
    ("dkdv", "sm80", "16", 128): Config(32, 64, 8, 2),
    ("dkdv", "sm80", "16", 256): Config(32, 32, 8, 2),
    ("dkdv", "sm86", "16", 64): Config(32, 64, 8, 2),
    ("dkdv", "sm86", "16", 128): Config(32, 64, 8, 2),
    ("dkdv", "sm86", "16", 256): Config(32, 32, 8, 1),
}
# sm_100 backward kernels: sm_90's spill-free ones (spill-free there for every flag combination too); at 128 the
# configurations sm_90 had before its measured tuning, which no B200 has measured against
_ATTENTION.update({(kernel, "sm100", "16", dim): config for (kernel, family, _, dim), config in _ATTENTION.items()
                   if family == "sm90" and kernel != "fwd" and not config.stack_budget})
_ATTENTION.update({("dq", "sm100", "16", 128): Config(64, 64, 8, 2),
                   ("dkdv", "sm100", "16", 128): Config(32, 64, 8, 2)})
# The same on every family (a few KB of shared memory). Up to head_dim 128: at 256 the fp32 dQ kernel spills at any
# tile size and warp count (rope_attention refuses fp32 past 128 for the Triton backend).
_FP32 = {
    ("fwd", 64): Config(32, 32, 4, 2), ("fwd", 128): Config(16, 16, 4, 1),
    ("dq", 64): Config(16, 16, 8, 1), ("dq", 128): Config(16, 16, 8, 1),
    ("dkdv", 64): Config(16, 16, 4, 1), ("dkdv", 128): Config(16, 32, 4, 1),
}
_ATTENTION.update({(kernel, family, "32", dim): config for (kernel, dim), config in _FP32.items()
                   for family in SHARED_MEMORY_PER_BLOCK})


ATTENTION_KERNELS = ("fwd", "dq", "dkdv")  # the names attention_config and override take
_OVERRIDES: dict[str, Config] = {}


@contextlib.contextmanager
def override(kernel: str, config: Config):
    """Launch the attention kernel `kernel` ("fwd", "dq", "dkdv") with `config` inside the block, whatever the table
    and the GPU: how benchmarks/tune_attention.py measures candidate configurations for the table."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"kernel must be 'fwd', 'dq' or 'dkdv', got {kernel!r}")
    previous = _OVERRIDES.get(kernel)
    _OVERRIDES[kernel] = config
    try:
        yield
    finally:
        if previous is None:
            del _OVERRIDES[kernel]
        else:
            _OVERRIDES[kernel] = previous


def attention_config(kernel: str, head_dim: int, dtype: torch.dtype, capability: tuple[int, int] | None,
                     gathered: bool = False) -> Config:
    """Launch configuration of the attention kernel `kernel` ("fwd", "dkdv", "dq") for q's head_dim and dtype on a
    GPU of compute capability `capability` (None: the CPU interpreter). `gathered`: the kernel's rotation spreads
    cos/sin to the columns with a gather (a padded head_dim, or partial half-split rotary), whose registers the
    rotating kernels (forward, dQ) pay for with fewer Q rows per tile (`gathered_block_m`, default half)."""
    if kernel in _OVERRIDES:
        return _OVERRIDES[kernel]
    if capability is None:
        return INTERPRETER
    padded = max(64, 1 << (head_dim - 1).bit_length())
    config = _ATTENTION[(kernel, family(capability), "32" if dtype == torch.float32 else "16", padded)]
    if gathered and kernel != "dkdv":
        config = dataclasses.replace(config, block_m=config.gathered_block_m or max(16, config.block_m // 2))
    return config


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
