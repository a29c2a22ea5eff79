"""Candidate launch configurations of the fused Triton attention kernels, timed on this GPU: the evidence behind
the table entries of `ctxext_kernels/ops/triton_configs.py` beyond "compiles without spills".

At one shape (causal, head_dim 128 or `--head-dim 64`, 32 q heads, 8 kv heads, bf16, 2 sequences of 8k tokens), each
kernel's candidates run under `triton_configs.override`:
  fwd     `fused_forward` (the K rotation by the RoPE kernel included, the same in every row)
  dq      `fused_backward` whole, dK/dV at its table configuration: rows differ by the dQ kernel alone
  dkdv    `fused_backward` whole, dQ at its table configuration
Before it is timed, a candidate's outputs are compared with the table configuration's (`max_diff`: the largest
|difference| over the largest |value|, at most `TOLERANCE`: a wrong tile boundary shows as errors of order one).
Then `fwd+bwd` with the fastest candidate of each kernel against the table's and against RoPE op + SDPA-flash
(bench_attention's providers), the comparison that decides the default backend.

`--jobs N` compiles every candidate first in N processes (Triton's on-disk cache), so the timed loop does not wait
for serial compiles of large kernels. A candidate that fails (shared memory, a compile error) is recorded as skipped.

    python benchmarks/tune_attention.py --jobs 12     # on a GPU (about 2 minutes on an H200 with 16 cores)
    python benchmarks/tune_attention.py --jobs 8 --compile-only  # only the compiles (beside other CPU work)
    python benchmarks/tune_attention.py --smoke       # seconds, on the CPU (Triton's interpreter, tiny tiles)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention  # noqa: E402
import harness  # noqa: E402

import ctxext_kernels as ck  # noqa: E402
from ctxext_kernels.ops import triton_configs  # noqa: E402
from ctxext_kernels.ops.attention import fused_backward, fused_forward  # noqa: E402
from ctxext_kernels.ops.triton_configs import Config  # noqa: E402

TOLERANCE = 0.02  # bf16 outputs: a different summation order moves them by an ulp or two (~0.8%)
KERNELS = triton_configs.ATTENTION_KERNELS
# fp16/bf16 at head_dim 128 in sm_90-sized shared memory (227 KB; at 64 every one fits): (block_m, block_n, warps,
# stages)
CANDIDATES = {
    "fwd": [(64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 2), (64, 128, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3),
            (128, 128, 8, 2), (128, 64, 4, 2), (128, 32, 4, 3), (64, 32, 4, 4)],
    "dq": [(64, 64, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 32, 8, 2), (128, 32, 4, 3),
           (128, 64, 8, 3), (64, 32, 4, 3), (128, 128, 8, 1), (64, 128, 8, 2)],
    "dkdv": [(32, 64, 8, 2), (32, 64, 4, 2), (32, 128, 4, 2), (32, 128, 8, 2), (32, 128, 4, 3), (32, 128, 8, 3),
             (64, 64, 4, 2), (64, 64, 8, 2), (64, 128, 8, 2), (16, 64, 4, 3), (16, 128, 4, 3), (64, 128, 8, 1)],
}
SMOKE_CANDIDATES = {kernel: [(16, 16, 4, 1), (32, 16, 4, 1)] for kernel in KERNELS}


def label(config: Config) -> str:
    return f"{config.block_m}x{config.block_n} w{config.num_warps} s{config.num_stages}"


class Shape:
    """The inputs of one shape, canonical `[B, S, H, D]`, and the launchers' keyword arguments."""

    def __init__(self, batch: int, seq: int, q_heads: int, kv_heads: int, head_dim: int, dtype, device: str):
        g = torch.Generator(device).manual_seed(0)
        self.q = torch.randn(batch, seq, q_heads, head_dim, device=device, dtype=dtype, generator=g)
        self.k, self.v = (torch.randn(batch, seq, kv_heads, head_dim, device=device, dtype=dtype, generator=g)
                          for _ in range(2))
        self.grad_out = torch.randn(self.q.shape, device=device, dtype=dtype, generator=g)
        self.spec = ck.RopeSpec.from_params(head_dim, 500000.0, device=device)
        self.flags = dict(positions=torch.arange(seq, device=device).expand(batch, seq).contiguous(),
                          inv_freq=self.spec.inv_freq.to(device, torch.float32), cu_seqlens=None,
                          scaling=float(self.spec.attention_scaling), softmax_scale=head_dim ** -0.5, causal=True,
                          interleaved=False, exact=True)
        self.out, self.lse = torch.empty_like(self.q), self.q.new_empty(self.q.shape[:3], dtype=torch.float32)
        self.grads = tuple(torch.empty_like(x) for x in (self.q, self.k, self.v))

    def forward(self):
        fused_forward("triton", self.q, self.k, self.v, self.out, self.lse, **self.flags)
        return (self.out,)

    def backward(self):
        dq, dk, dv = self.grads
        fused_backward("triton", self.grad_out, self.q, self.k, self.v, self.out, self.lse, dq, dk, dv, **self.flags)
        return self.grads

    def run(self, kernel: str):
        return self.forward() if kernel == "fwd" else self.backward()


def _compile(kernel: str, config: tuple, shape_args: tuple) -> str:
    """In a worker process: one launch of `kernel` under `config` at a short sequence (the same specialization as the
    timed shape: lengths divisible by 16), filling Triton's cache; "" or the failure."""
    try:
        shape = Shape(*shape_args[:1], 256, *shape_args[2:])
        shape.forward()
        with triton_configs.override(kernel, Config(*config)):
            shape.run(kernel)
        if shape.q.is_cuda:
            torch.cuda.synchronize()
        return ""
    except Exception as exc:  # noqa: BLE001 - recorded, the timed loop skips it with the reason
        return harness.failure(exc)


def precompile(candidates: dict, shape_args: tuple, jobs: int) -> None:
    context = multiprocessing.get_context("spawn")  # CUDA in the workers
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = {pool.submit(_compile, kernel, config, shape_args): (kernel, config)
                   for kernel, configs in candidates.items() for config in configs}
        for future in concurrent.futures.as_completed(futures):
            kernel, config = futures[future]
            error = future.result()
            print(f"[compile] {kernel} {label(Config(*config))}: {error or 'ok'}", flush=True)


def max_diff(got, want) -> float:
    return max(((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-30)).item()
               for g, w in zip(got, want))


def main(argv=None) -> None:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=0,
                   help="processes that compile the candidates first, into Triton's cache")
    p.add_argument("--compile-only", action="store_true",
                   help="with --jobs: fill Triton's cache and stop (the timed run then loads every kernel from it)")
    p.add_argument("--head-dim", type=int, default=128, choices=(64, 128), help="head_dim (default 128)")
    p.add_argument("--seq", type=int, default=8192, help="tokens per sequence (default 8192)")
    p.add_argument("--batch", type=int, default=2, help="sequences (default 2)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        raise SystemExit("tune_attention.py times compiled kernels: it needs a GPU (or --smoke on the CPU)")
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--smoke runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
        candidates, shape_args = SMOKE_CANDIDATES, (1, 48, 4, 2, 32, torch.float32, device)
    else:
        candidates, shape_args = CANDIDATES, (args.batch, args.seq, 32, 8, args.head_dim, torch.bfloat16, device)
    if args.jobs:
        precompile(candidates, shape_args, args.jobs)
    if args.compile_only:
        return
    repeats = args.repeats or (2 if args.smoke else 20)
    case_of = {kernel: {"kernel": kernel, "seq": shape_args[1]} for kernel in (*KERNELS, "fwd+bwd")}
    planned = [(case_of[kernel], label(Config(*c))) for kernel in KERNELS for c in candidates[kernel]]
    planned += [(case_of["fwd+bwd"], name) for name in ("table", "tuned", bench_attention.BASELINE)]

    def derive(rows):  # speed-up over the table configuration's row of the same kernel
        table = {r.case["kernel"]: r.metrics["ms_p50"] for r in rows if not r.skipped and r.metrics.get("is_table")}
        for r in rows:
            if not r.skipped and r.case["kernel"] in table:
                r.metrics["speedup_vs_table"] = table[r.case["kernel"]] / r.metrics["ms_p50"]

    report = harness.Report(
        "tune_attention" + ("_smoke" if args.smoke else "" if args.head_dim == 128 else f"_d{args.head_dim}"),
        {"shape": "batch, seq, q_heads, kv_heads, head_dim = " + ", ".join(map(str, shape_args[:5])),
         "dtype": str(shape_args[5]), "causal": True, "repeats": repeats, "tolerance": TOLERANCE,
         "family": None if device == "cpu" else triton_configs.family(torch.cuda.get_device_capability())},
        args.output, planned, time_budget=args.time_budget, device=device, x="seq", y="ms_p50", panels=("kernel",),
        log_x=False, columns=("ms_p50", "ms_p20", "ms_p80", "speedup_vs_table", "max_diff"), derive=derive)
    shape = Shape(*shape_args)
    reference = {"fwd": [x.clone() for x in shape.forward()], "dq": [x.clone() for x in shape.backward()]}
    reference["dkdv"] = reference["dq"]
    capability = triton_configs.capability(shape.q.device)
    best = {}
    for kernel in KERNELS:
        if kernel != "fwd":  # the backward reads out and lse: the table configuration's, as its reference did
            shape.forward()
        table_config = triton_configs.attention_config(kernel, shape_args[4], shape_args[5], capability)
        for config in map(lambda c: Config(*c), candidates[kernel]):
            if report.expired():
                break
            case = case_of[kernel]
            try:
                with triton_configs.override(kernel, config):
                    diff = max_diff(shape.run(kernel), reference[kernel])
                    if diff > TOLERANCE:
                        raise AssertionError(f"outputs differ from the table configuration's by {diff:.3g}")
                    result = harness.measure("tune_attention", label(config), case, lambda: shape.run(kernel),
                                             repeats=repeats, warmup=1 if args.smoke else 3, device=device)
            except Exception as exc:  # noqa: BLE001 - a failing candidate is a row with its reason
                result = harness.skipped("tune_attention", label(config), case, harness.failure(exc))
            if not result.skipped:
                result.metrics.update(max_diff=diff, is_table=config == table_config)
                if kernel not in best or result.metrics["ms_p50"] < best[kernel][1]:
                    best[kernel] = (config, result.metrics["ms_p50"])
            report.add(result)
    # fwd+bwd: the table's configurations, the fastest candidates, and the unfused alternative (bench_attention's)
    views = [x.transpose(1, 2) for x in (shape.q, shape.k, shape.v, shape.grad_out)]
    fused = bench_attention.autograd_provider(  # bench_attention's fused-triton, which a CPU run has not
        lambda q, k, v, pos, spec: ck.rope_attention(q, k, v, pos, spec, backend="triton", check_positions=False))
    baseline = bench_attention.providers(device, quick=False)[bench_attention.BASELINE]
    tuned = {kernel: config for kernel, (config, _) in best.items()}
    for name, factory, configs in (("table", fused, {}), ("tuned", fused, tuned),
                                   (bench_attention.BASELINE, baseline, {})):
        if report.expired():
            break
        step = factory(*views[:3], shape.flags["positions"], shape.spec, views[3])

        def run(step=step, configs=configs):
            with contextlib.ExitStack() as stack:
                for kernel, config in configs.items():
                    stack.enter_context(triton_configs.override(kernel, config))
                return step()
        report.add(harness.measure("tune_attention", name, case_of["fwd+bwd"], run, repeats=repeats,
                                   warmup=1 if args.smoke else 3, device=device))
    for kernel, (config, ms) in best.items():
        print(f"fastest {kernel}: {label(config)} ({ms:.4g} ms)", flush=True)
    report.finish()


if __name__ == "__main__":
    main()
