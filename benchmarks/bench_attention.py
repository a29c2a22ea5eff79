"""Fused RoPE + attention against rotating separately and then attending: time and TFLOP/s, forward and fwd+bwd.

Causal, head_dim 128, 32 q heads with 8 or 32 kv heads, bf16, 1k-64k tokens per sequence (batch = 16k tokens / seq,
at least 1), longest first. Providers:
  fused-triton, fused-cuda          `rope_attention` (q, k unrotated; the rotation is the kernels' business)
  fused-*-norope                    the same kernels with RoPE off (`fused_forward/backward(..., rotate=False)`):
                                    fused / norope - 1 is what RoPE costs inside
  ropeop+sdpa-flash                 our `apply_rope`, then `scaled_dot_product_attention` on its flash backend: the
                                    unfused alternative the fused kernels must beat
  sdpa-flash-norope                 SDPA flash alone, no RoPE: the attention ceiling (full sweep)
  hf-rope+sdpa                      transformers' apply_rotary_pos_emb on rope_cos_sin tables, then SDPA's default
                                    backend (full sweep)
  flash-attn                        flash-attn's rotary + flash_attn_func, when installed (full sweep)
TFLOP/s count the causal attention matmuls only (4 * B * Hq * S^2 * D / 2 forward, 2.5x that backward), so RoPE is
pure overhead in every figure. `pct_of_sdpa_flash` relates each provider to the SDPA-flash ceiling. Under the table,
the break-even table: the speed-up of each fused kernel over ropeop+sdpa-flash per length, the RoPE cost inside it, and
the length from which the fused kernel is faster.

`--quick` (stage 1 of benchmarks/run_all.sh): 64k, 8k and 1k tokens, the fused kernels, their RoPE-off twins and
ropeop+sdpa-flash. On the CPU (`--smoke`) the fused kernel is the torch reference (Triton's interpreter takes seconds
per call: tests/test_harness.py checks the RoPE-off wiring in it instead) and SDPA runs its math backend.

    python benchmarks/bench_attention.py            # full sweep on a GPU
    python benchmarks/bench_attention.py --quick    # three lengths, the core providers
    python benchmarks/bench_attention.py --smoke    # seconds, on CPU (torch backend, tiny shapes)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import ctxext_kernels as ck  # noqa: E402
from ctxext_kernels.ops.attention import fused_backward, fused_forward  # noqa: E402

TOKENS_PER_BATCH = 16384
MAX_MS = 1000.0  # cap on one measurement's timed loop (harness.time_ms): a 64k fwd+bwd call takes ~0.3-1 s
BASELINE = "ropeop+sdpa-flash"
QUICK_PROVIDERS = ("fused-triton", "fused-cuda", "fused-triton-norope", "fused-cuda-norope", BASELINE)


def _sdpa(q, k, v, flash: bool):
    """Causal SDPA on `[B, H, S, D]`, on the flash backend when asked (GPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = q.shape[1] != k.shape[1]
    if not flash:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


# A provider is factory(q, k, v, pos, spec, grad_out) -> the callable to time: q `[B, Hq, S, D]`, k and v
# `[B, Hk, S, D]`, pos `[B, S]`; grad_out None times the forward (which returns out `[B, Hq, S, D]`), else forward +
# backward with that output gradient (returning dq, dk, dv in q's, k's and v's shapes).


def autograd_provider(forward):
    """A provider from a differentiable forward(q, k, v, pos, spec) -> out."""
    def factory(q, k, v, pos, spec, grad_out=None):
        if grad_out is None:
            return lambda: forward(q, k, v, pos, spec)
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]

        def step():
            forward(*leaves, pos, spec).backward(grad_out)
            grads = tuple(x.grad for x in leaves)
            for x in leaves:
                x.grad = None
            return grads
        return step
    return factory


def fused_norope(backend: str):
    """The fused kernels with RoPE off, through the launchers (`fused_forward/backward(..., rotate=False)`: no
    autograd, no checks)."""
    def factory(q, k, v, pos, spec, grad_out=None):
        qc, kc, vc = (x.transpose(1, 2) for x in (q, k, v))  # canonical [B, S, H, D] views
        out = torch.empty_like(qc)
        lse = q.new_empty(qc.shape[:3], dtype=torch.float32)
        flags = dict(positions=pos, inv_freq=spec.inv_freq.to(q.device, torch.float32), cu_seqlens=None,
                     scaling=float(spec.attention_scaling), softmax_scale=q.shape[-1] ** -0.5, causal=True,
                     interleaved=False, exact=True, rotate=False)

        def forward():
            fused_forward(backend, q=qc, k=kc, v=vc, out=out, lse=lse, **flags)
            return out.transpose(1, 2)
        if grad_out is None:
            return forward
        dq, dk, dv = torch.empty_like(qc), torch.empty_like(kc), torch.empty_like(vc)

        def step():
            forward()
            fused_backward(backend, grad_out=grad_out.transpose(1, 2), q=qc, k=kc, v=vc, out=out, lse=lse, dq=dq,
                           dk=dk, dv=dv, **flags)
            return tuple(x.transpose(1, 2) for x in (dq, dk, dv))
        return step
    return factory


def _hf_rope_sdpa(q, k, v, pos, spec):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = ck.rope_cos_sin(pos, spec, dtype=q.dtype)  # transformers-layout tables, as its rotary module makes
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
    return _sdpa(q_rot, k_rot, v, flash=False)


def _flash_attn(q, k, v, pos, spec):
    from flash_attn import flash_attn_func
    from flash_attn.layers.rotary import apply_rotary_emb

    cos, sin = ck.rope_cos_sin(pos[0], spec, dtype=q.dtype)
    half = cos.shape[-1] // 2
    qs, ks, vs = (x.transpose(1, 2) for x in (q, k, v))  # flash-attn takes [B, S, H, D]
    q_rot = apply_rotary_emb(qs, cos[:, :half], sin[:, :half])
    k_rot = apply_rotary_emb(ks, cos[:, :half], sin[:, :half])
    return flash_attn_func(q_rot, k_rot, vs, causal=True).transpose(1, 2)


def providers(device: str, quick: bool) -> dict:
    """name -> provider factory; `quick` keeps `QUICK_PROVIDERS`."""
    on_gpu = device == "cuda"
    table = {}
    for backend in ("triton", "cuda") if on_gpu else ():
        table[f"fused-{backend}"] = autograd_provider(
            lambda q, k, v, pos, spec, b=backend: ck.rope_attention(q, k, v, pos, spec, backend=b,
                                                                     check_positions=False))
        table[f"fused-{backend}-norope"] = fused_norope(backend)
    if not on_gpu:
        table["fused-torch-reference"] = autograd_provider(
            lambda q, k, v, pos, spec: ck.rope_attention(q, k, v, pos, spec, backend="torch"))
    table[BASELINE] = autograd_provider(
        lambda q, k, v, pos, spec: _sdpa(*ck.apply_rope(q, k, pos, spec, check_positions=False), v, flash=on_gpu))
    table["sdpa-flash-norope"] = autograd_provider(lambda q, k, v, pos, spec: _sdpa(q, k, v, flash=on_gpu))
    table["hf-rope+sdpa"] = autograd_provider(_hf_rope_sdpa)
    if on_gpu:
        table["flash-attn"] = autograd_provider(_flash_attn)
    if quick:
        table = {name: factory for name, factory in table.items() if name in QUICK_PROVIDERS}
    return table


def _times(rows) -> dict:
    return {(r.provider, r.case["kv_heads"], r.case["mode"], r.case["seq"]): r.metrics["ms_p50"]
            for r in rows if not r.skipped}


def break_even(rows) -> str:
    """Markdown: per fused kernel, kv heads and mode, the speed-up over `BASELINE` at each length (time of the
    baseline / time of the fused kernel; > 1: fused is faster) with the RoPE cost inside (fused / norope - 1), and
    the shortest length from which the fused kernel is faster at every longer length measured."""
    times = _times(rows)
    seqs = sorted({r.case["seq"] for r in rows})
    lines = [f"## Break-even: fused RoPE + attention vs `{BASELINE}`", "",
             f"Cell: speed-up = `{BASELINE}` time / fused time (> 1: fused is faster), and in brackets the RoPE cost "
             "inside the fused kernel (fused time / the same kernel with RoPE off - 1). "
             "`-`: not measured.", "",
             "| fused | kv_heads | mode | " + " | ".join(str(s) for s in seqs) + " | fused faster from |",
             "|" + "---|" * (len(seqs) + 4)]
    for fused in sorted({r.provider for r in rows if r.provider.startswith("fused-")
                         and not r.provider.endswith("-norope")}):
        for kv in sorted({r.case["kv_heads"] for r in rows}):
            for mode in ("fwd", "fwd+bwd"):
                cells, speedups = [], {}
                for seq in seqs:
                    mine, base = times.get((fused, kv, mode, seq)), times.get((BASELINE, kv, mode, seq))
                    norope = times.get((f"{fused}-norope", kv, mode, seq))
                    if mine is None or base is None:
                        cells.append("-")
                        continue
                    speedups[seq] = base / mine
                    cost = f" ({100 * (mine / norope - 1):+.0f}%)" if norope else ""
                    cells.append(f"{speedups[seq]:.2f}x{cost}")
                if not speedups:
                    continue
                from_seq = "never"
                for seq in sorted(speedups, reverse=True):  # walk down from the longest while fused stays faster
                    if speedups[seq] < 1:
                        break
                    from_seq = str(seq)
                lines.append(f"| {fused} | {kv} | {mode} | " + " | ".join(cells) + f" | {from_seq} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = harness.parser(__doc__.splitlines()[0]).parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.smoke:
        head_dim, q_heads, kv_options, seqs, tokens_per_batch = 32, 4, (4, 1), [64, 32], 64
    else:
        head_dim, q_heads, kv_options, tokens_per_batch = 128, 32, (8, 32), TOKENS_PER_BATCH
        seqs = [65536, 8192, 1024] if args.quick else [65536, 32768, 16384, 8192, 4096, 2048, 1024]
    repeats = args.repeats or (3 if args.smoke else 30)
    spec = ck.RopeSpec.from_params(head_dim, 500000.0, device=device)
    table = providers(device, quick=args.quick and not args.smoke)
    cases = [{"seq": s, "batch": max(1, tokens_per_batch // s), "kv_heads": kv, "mode": mode}
             for s in seqs for kv in kv_options for mode in ("fwd", "fwd+bwd")]

    def derive(rows):
        harness.add_relative(rows, "sdpa-flash-norope", "tflops", ("seq", "kv_heads", "mode"),
                             name="pct_of_sdpa_flash")

    report = harness.Report(
        harness.report_name("bench_attention", args),
        {"dtype": str(dtype), "head_dim": head_dim, "q_heads": q_heads, "causal": True,
         "tokens_per_batch": tokens_per_batch, "repeats": repeats, "max_ms": MAX_MS, "smoke": args.smoke,
         "quick": args.quick},
        args.output, [(case, name) for case in cases for name in table], time_budget=args.time_budget,
        device=device, x="seq", y="tflops", panels=("kv_heads", "mode"),
        columns=("ms_p50", "ms_p20", "ms_p80", "tflops", "pct_of_sdpa_flash", "peak_mib"), derive=derive,
        appendix=break_even)
    for case in cases:
        if report.expired():
            break
        batch, seq, kv_heads = case["batch"], case["seq"], case["kv_heads"]
        q = torch.randn(batch, q_heads, seq, head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(batch, kv_heads, seq, head_dim, device=device, dtype=dtype) for _ in range(2))
        pos = torch.arange(seq, device=device).expand(batch, seq)
        grad_out = None if case["mode"] == "fwd" else torch.randn_like(q)  # the same for every provider
        flops = 4 * batch * q_heads * seq * seq * head_dim / 2 * (1.0 if case["mode"] == "fwd" else 3.5)
        for name, factory in table.items():
            if report.expired():
                break
            try:
                fn = factory(q, k, v, pos, spec, grad_out)
            except Exception as exc:  # noqa: BLE001 - a peer that is not installed, or a launcher that changed
                report.add(harness.skipped("attention", name, case, harness.failure(exc)))
                continue
            report.add(harness.measure("attention", name, case, fn, repeats=repeats, warmup=1 if args.smoke else 2,
                                       flops=flops, memory=device == "cuda", device=device,
                                       max_ms=None if args.smoke else MAX_MS))
        del q, k, v, grad_out
        if device == "cuda":
            torch.cuda.empty_cache()
    report.finish()


if __name__ == "__main__":
    main()
