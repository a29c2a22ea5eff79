"""RoPE kernel speed against the peers and the bandwidth ceiling (a `copy_` of the same bytes).

LLaMA-7B/8B shapes: head_dim 128, 32 q heads, 8 (LLaMA-3 8B) or 32 (LLaMA-2 7B) kv heads, bf16, 4k-256k tokens
(batch x 8k sequences above 8k), plus one decode token. q and k are `[B, H, S, D]` views of `[B, S, H, D]` projections,
as a transformers attention layer hands them over. Largest case first, the decode token last: a sweep cut short by
`--time-budget` has the bandwidth-bound sizes that matter most. `--quick` (stage 1 of benchmarks/run_all.sh) measures
256k, 64k, 16k, 4k and decode without the torch.compile peer, whose first compile alone takes 30-60 s.

Providers
---------
- ctxext-cuda / ctxext-triton: the public `apply_rope(..., backend=...)`, checks included (the position-range check
  costs one host sync).
- ctxext-cuda-nocheck: the same call with `check_positions=False`, as the transformers integration makes it (no
  host sync), forward and backward.
- ctxext-cuda-raw / ctxext-triton-raw: the launcher alone (`rope_forward`, forward only), so the Python overhead of
  the public call is visible at decode sizes (`wall_ms_*` columns: back-to-back calls, host time included).
- hf-eager: transformers' `LlamaRotaryEmbedding` (cos/sin from the position ids) + `apply_rotary_pos_emb`, the same
  work as ours; hf-apply: `apply_rotary_pos_emb` alone with the table precomputed (the per-layer cost when one table is
  shared by all layers); hf-compiled: `torch.compile` of hf-eager (full sweep only).
- liger / flash-attn: Liger-Kernel's and flash-attn's Triton rotary, when importable (else recorded as skipped).
- copy: `copy_` of q and k into preallocated outputs, the bandwidth ceiling.

Accuracy: `max_err` (fwd rows) is the largest absolute error of the first call's output against a float64 rotation
by the exact angle position * inv_freq, over the last sequence's last `ORACLE_TOKENS` tokens: a fast wrong kernel shows.

Bytes counted: read q and k once, write q and k once, read the position ids (fwd+bwd: twice that, the backward being
one more rotation of the gradients). GB/s = bytes / median time; pct_of_copy = GB/s / copy's GB/s at the same shape.

    python benchmarks/bench_rope.py            # full sweep on a GPU
    python benchmarks/bench_rope.py --quick    # fewer token counts, no torch.compile (stage 1 on a lent GPU)
    python benchmarks/bench_rope.py --smoke    # seconds, on the CPU (cpu/torch backends)
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import ctxext_kernels as ck  # noqa: E402

SEQ_PER_SEQUENCE = 8192  # above this many tokens, the batch grows instead of the sequence
ORACLE_TOKENS = 512  # tokens checked against the float64 oracle (the largest positions of the case)
MAX_MS = 1000.0  # cap on one measurement's timed loop (harness.time_ms): the slow peers at 256k tokens


@dataclasses.dataclass
class Inputs:
    """One case's tensors. q `[B, Hq, S, D]`, k `[B, Hk, S, D]` (views of `[B, S, H, D]`), positions `[B, S]`,
    cos/sin `[B, S, D]` (for the peers that take tables), spec, and the transformers rotary module."""

    q: torch.Tensor
    k: torch.Tensor
    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    spec: ck.RopeSpec
    rotary: torch.nn.Module


# A provider turns Inputs into a zero-argument callable returning the rotated (q, k); raising means "skip this case".
Provider = Callable[[Inputs], Callable[[], object]]


def _llama_config(kv_heads: int, head_dim: int, q_heads: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=q_heads * head_dim, num_attention_heads=q_heads, num_key_value_heads=kv_heads,
                       head_dim=head_dim, rope_theta=500000.0, max_position_embeddings=262144)


def _public(backend: str, check_positions: bool = True) -> Provider:
    return lambda x: (lambda: ck.apply_rope(x.q, x.k, x.positions, x.spec, backend=backend,
                                            check_positions=check_positions))


def _raw(backend: str) -> Provider:
    """The launcher alone, on the canonical `[B, S, H, D]` views the op layer would hand it."""
    def factory(x: Inputs):
        if backend == "triton":
            from ctxext_kernels.ops.triton_rope import rope_forward
        else:
            from ctxext_kernels.ops.cuda_ext import rope_forward
        q, k = x.q.transpose(1, 2), x.k.transpose(1, 2)
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        inv_freq = x.spec.inv_freq.to(q.device, torch.float32).contiguous()
        scaling, exact = float(x.spec.attention_scaling), x.spec.angle == "exact"
        outputs = (q_out.transpose(1, 2), k_out.transpose(1, 2))  # made once: the timed call stays the bare launch

        def run():
            rope_forward(q, k, q_out, k_out, x.positions, inv_freq, scaling, False, False, exact)
            return outputs
        return run
    return factory


def _hf_eager(x: Inputs):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    def run():
        cos, sin = x.rotary(x.q, x.positions)
        return apply_rotary_pos_emb(x.q, x.k, cos, sin)
    return run


def _hf_apply(x: Inputs):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return lambda: apply_rotary_pos_emb(x.q, x.k, x.cos, x.sin)


@functools.cache
def _compiled_hf_rope(rotary: torch.nn.Module) -> Callable:
    """`torch.compile` of LlamaRotaryEmbedding + apply_rotary_pos_emb, compiled once for the whole sweep.

    Dynamic shapes from the first call (`dynamic=True`), as a model serving many lengths is compiled: one compile
    serves every case (the decode token may add one), instead of a static graph for the first shape and a dynamic
    recompile at the second.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    def rope(q, k, positions):
        cos, sin = rotary(q, positions)
        return apply_rotary_pos_emb(q, k, cos, sin)
    return torch.compile(rope, dynamic=True)


def _hf_compiled(x: Inputs):
    compiled = _compiled_hf_rope(x.rotary)
    return lambda: compiled(x.q, x.k, x.positions)


def _liger(x: Inputs):
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    # Liger rotates q and k in place: repeated calls keep rotating the same buffers (the same bytes move each time),
    # so it runs last among the providers of a case, after the others have read the original inputs
    return lambda: liger_rotary_pos_emb(x.q, x.k, x.cos, x.sin)


def _flash_attn(x: Inputs):
    from flash_attn.layers.rotary import apply_rotary_emb

    half = x.cos.shape[-1] // 2  # flash-attn takes `[S, rotary_dim / 2]` tables shared by the batch
    cos, sin = x.cos[0, :, :half].contiguous(), x.sin[0, :, :half].contiguous()
    q, k = x.q.transpose(1, 2), x.k.transpose(1, 2)  # it takes and returns `[B, S, H, D]`
    return lambda: (apply_rotary_emb(q, cos, sin).transpose(1, 2), apply_rotary_emb(k, cos, sin).transpose(1, 2))


def _copy(x: Inputs):
    q_out, k_out = torch.empty_like(x.q), torch.empty_like(x.k)
    return lambda: (q_out.copy_(x.q), k_out.copy_(x.k))


FORWARD_ONLY = {"copy", "ctxext-cuda-raw", "ctxext-triton-raw", "ctxext-cpu-raw"}  # no autograd through these


def providers(device: str, full: bool) -> dict[str, Provider]:
    """The providers that make sense on `device` (peers that are not installed are kept: they record why); `full`
    adds the torch.compile peer."""
    table: dict[str, Provider] = {"copy": _copy}
    if device == "cuda":
        table.update({"ctxext-cuda": _public("cuda"), "ctxext-cuda-nocheck": _public("cuda", False),
                      "ctxext-cuda-raw": _raw("cuda"), "ctxext-triton": _public("triton"),
                      "ctxext-triton-raw": _raw("triton")})
    else:
        table.update({"ctxext-cpu": _public("cpu"), "ctxext-cpu-nocheck": _public("cpu", False),
                      "ctxext-cpu-raw": _raw("cpu"), "ctxext-torch": _public("torch")})
    table.update({"hf-eager": _hf_eager, "hf-apply": _hf_apply})
    if full:
        table["hf-compiled"] = _hf_compiled
    if device == "cuda":
        table.update({"flash-attn": _flash_attn, "liger": _liger})  # liger last: it overwrites its inputs
    return table


@functools.cache
def _rotary_module(head_dim: int, q_heads: int, device: str) -> torch.nn.Module:
    """One LlamaRotaryEmbedding for the sweep (its frequencies do not depend on the kv heads): the compiled peer then
    sees the same module in every case instead of recompiling for a new one."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(_llama_config(q_heads, head_dim, q_heads)).to(device)


def make_inputs(tokens: int, kv_heads: int, q_heads: int, head_dim: int, dtype: torch.dtype, device: str,
                requires_grad: bool) -> Inputs:
    """Random q/k (never zeros: they can run faster than real data), positions 0..S-1 shared by the batch."""
    batch, seq = (1, tokens) if tokens <= SEQ_PER_SEQUENCE else (tokens // SEQ_PER_SEQUENCE, SEQ_PER_SEQUENCE)
    q = torch.randn(batch, seq, q_heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(batch, seq, kv_heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
    q.requires_grad_(requires_grad)
    k.requires_grad_(requires_grad)
    positions = torch.arange(seq, device=device).expand(batch, seq)
    config = _llama_config(kv_heads, head_dim, q_heads)
    spec = ck.RopeSpec.from_hf_config(config, device=device)
    rotary = _rotary_module(head_dim, q_heads, device)
    with torch.no_grad():
        cos, sin = rotary(q, positions)
    return Inputs(q, k, positions, cos, sin, spec, rotary)


def bytes_moved(x: Inputs) -> int:
    """Read q, k + write q, k + read positions: the fewest bytes any RoPE implementation must move."""
    return 2 * (x.q.numel() + x.k.numel()) * x.q.element_size() + x.positions.numel() * x.positions.element_size()


def oracle(x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 rotation of the last sequence's last `ORACLE_TOKENS` tokens: `[Hq, T, D]`, `[Hk, T, D]`."""
    positions = x.positions[-1, -ORACLE_TOKENS:].double()
    angle = positions[:, None] * x.spec.inv_freq.double().to(positions.device)[None, :]  # [T, D/2], exact product
    cos, sin = angle.cos() * x.spec.attention_scaling, angle.sin() * x.spec.attention_scaling

    def rotate(t: torch.Tensor) -> torch.Tensor:
        first, second = t[-1, :, -ORACLE_TOKENS:].double().chunk(2, dim=-1)
        return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    return rotate(x.q), rotate(x.k)


def max_error(outputs, expected: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Largest |output - oracle| over the oracle's slice of q_rot and k_rot (`[B, H, S, D]` each)."""
    return max((out[-1, :, -ORACLE_TOKENS:].double() - ref).abs().max().item()
               for out, ref in zip(outputs[:2], expected))


def with_backward(forward: Callable[[], object], x: Inputs) -> Callable[[], object]:
    """forward + backward with fixed random output gradients; `autograd.grad` so no `.grad` accumulation is timed."""
    grad_q, grad_k = torch.randn_like(x.q), torch.randn_like(x.k)

    def run():
        q_rot, k_rot = forward()[:2]
        return torch.autograd.grad((q_rot, k_rot), (x.q, x.k), (grad_q, grad_k))
    return run


def measure_provider(name: str, factory: Provider, x: Inputs, case: dict, expected, moved: int, repeats: int,
                     device: str, max_ms: float | None = None) -> harness.Result:
    """One provider on one case: build its callable, check its first forward output against the oracle (fwd rows),
    time it. A peer that is not installed, rejects the shape or fails on its first call becomes a skipped row."""
    fwd = case["mode"] == "fwd"
    try:
        forward = factory(x)
        # the first call, before timing: Liger (last) is then still rotating the original inputs
        error = max_error(forward(), expected) if fwd and name != "copy" else None
    except Exception as exc:  # noqa: BLE001 - the reason goes into the table
        return harness.skipped("rope", name, case, harness.failure(exc))
    fn = forward if fwd else with_backward(forward, x)
    # at one token the launch and Python overhead is the whole cost: time back-to-back calls too
    result = harness.measure("rope", name, case, fn, repeats=repeats, bytes_moved=moved, wall=case["tokens"] == 1,
                             device=device, max_ms=max_ms)
    if error is not None and not result.skipped:
        result.metrics["max_err"] = error
    return result


def main(argv=None) -> None:
    args = harness.parser(__doc__.splitlines()[0]).parse_args(argv)
    threads = torch.get_num_threads()
    if args.smoke:
        torch.set_num_threads(1)  # a busy 2-core CI machine makes thread-pool wake-ups dominate tiny CPU timings
    try:
        run(args)
    finally:
        torch.set_num_threads(threads)


def run(args) -> Path:
    """The sweep `args` (from `harness.parser`) asks for; returns the results folder."""
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q_heads, head_dim = (32, 128) if not args.smoke else (4, 64)
    if args.smoke:
        token_counts, kv_options = [256, 1], (4, 1)
    elif args.quick:
        token_counts, kv_options = [262144, 65536, 16384, 4096, 1], (8, 32)
    else:
        token_counts, kv_options = [262144, 131072, 65536, 32768, 16384, 8192, 4096, 1], (8, 32)
    repeats = args.repeats or (5 if args.smoke else 50)
    table = providers(device, full=not (args.smoke or args.quick))
    torch.manual_seed(0)
    # token counts outermost, largest first: a sweep cut short still covers both kv-head counts and both modes
    cases = [{"tokens": n, "kv_heads": kv, "mode": mode} for n in token_counts for kv in kv_options
             for mode in ("fwd", "fwd+bwd")]

    def wanted(case):
        return [name for name in table if case["mode"] == "fwd" or name not in FORWARD_ONLY]

    report = harness.Report(
        harness.report_name("bench_rope", args),
        {"dtype": str(dtype), "q_heads": q_heads, "head_dim": head_dim, "rope_theta": 500000.0,
         "repeats": repeats, "max_ms": MAX_MS, "smoke": args.smoke, "quick": args.quick,
         "layout": "bhsd views of bshd"},
        args.output, [(case, name) for case in cases for name in wanted(case)], time_budget=args.time_budget,
        device=device, x="tokens", y="gbps", panels=("kv_heads", "mode"),
        columns=("ms_p50", "ms_p20", "ms_p80", "gbps", "pct_of_copy", "pct_of_peak", "wall_ms_p50", "max_err"),
        # fwd+bwd moves twice the bytes of fwd and is held to the same copy bandwidth
        derive=lambda rows: harness.add_relative(rows, "copy", "gbps", ("tokens", "kv_heads"), name="pct_of_copy"))
    for case in cases:
        if report.expired():
            break
        x = make_inputs(case["tokens"], case["kv_heads"], q_heads, head_dim, dtype, device,
                        requires_grad=case["mode"] == "fwd+bwd")
        moved = bytes_moved(x) * (1 if case["mode"] == "fwd" else 2)
        expected = oracle(x) if case["mode"] == "fwd" else None
        for name in wanted(case):
            if report.expired():
                break
            report.add(measure_provider(name, table[name], x, case, expected, moved, repeats, device,
                                        max_ms=None if args.smoke else MAX_MS))
        del x
        if device == "cuda":
            torch.cuda.empty_cache()
    return report.finish()


if __name__ == "__main__":
    main()
