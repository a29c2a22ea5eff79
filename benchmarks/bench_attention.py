"""Fused RoPE + attention against rotating separately and then attending: time and TFLOP/s, forward and fwd+bwd.

Causal, head_dim 128, 32 q heads with 8 or 32 kv heads, bf16, 1k-64k tokens per sequence (batch = 16k tokens / seq,
at least 1). Providers:
  fused-triton, fused-cuda          `rope_attention` (q, k unrotated; rotation inside the kernel)
  fused-*-norope                    the same kernels with the rotation switched off: the cost of RoPE inside
  ropeop+sdpa-flash                 our `apply_rope`, then `scaled_dot_product_attention` on its flash backend
  hf-rope+sdpa                      transformers' eager rotary embedding + apply_rotary_pos_emb, then SDPA (default)
  sdpa-flash-norope                 SDPA flash alone, no RoPE: the attention ceiling the fused kernels aim at
  flash-attn                        flash-attn's rotary + flash_attn_func, when installed
TFLOP/s count the causal attention matmuls only (4 * B * Hq * S^2 * D / 2 forward, 2.5x that backward), so RoPE is
pure overhead in every figure. `pct_of_sdpa_flash` relates each provider to the SDPA-flash ceiling.

    python benchmarks/bench_attention.py            # full sweep on a GPU
    python benchmarks/bench_attention.py --quick    # fewer lengths
    python benchmarks/bench_attention.py --smoke    # seconds, on CPU (torch backend, tiny shapes)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import ctxext_kernels as ck  # noqa: E402
from ctxext_kernels.ops.attention import fused_backward, fused_forward  # noqa: E402

TOKENS_PER_BATCH = 16384


def _sdpa(q, k, v, flash: bool):
    """Causal SDPA on `[B, H, S, D]`, on the flash backend when asked (GPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = q.shape[1] != k.shape[1]
    if not flash:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


def _autograd(forward):
    """A provider from a differentiable forward(q, k, v, pos, spec) -> out."""
    def factory(q, k, v, pos, spec, mode):
        if mode == "fwd":
            return lambda: forward(q, k, v, pos, spec)
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        grad = torch.randn_like(q)

        def step():
            forward(*leaves, pos, spec).backward(grad)
            for x in leaves:
                x.grad = None
        return step
    return factory


def _fused_raw(backend: str, rotate: bool):
    """The fused launchers called directly (no autograd, no checks), with or without the rotation."""
    def factory(q, k, v, pos, spec, mode):
        qc, kc, vc = (x.transpose(1, 2) for x in (q, k, v))  # canonical [B, S, H, D] views
        out = torch.empty_like(qc)
        lse = q.new_empty(qc.shape[:3], dtype=torch.float32)
        inv_freq = spec.inv_freq.to(q.device)
        # scaling, softmax scale, then causal, interleaved, exact, rotate
        flags = (float(spec.attention_scaling), q.shape[-1] ** -0.5, True, False, True, rotate)

        def forward():
            fused_forward(backend, qc, kc, vc, out, lse, pos, inv_freq, None, *flags)
        if mode == "fwd":
            return forward
        grad = torch.randn_like(qc)
        dq, dk, dv = torch.empty_like(qc), torch.empty_like(kc), torch.empty_like(vc)

        def step():
            forward()
            fused_backward(backend, grad, qc, kc, vc, out, lse, dq, dk, dv, pos, inv_freq, None, *flags)
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


def _providers(device: str) -> dict:
    on_gpu = device == "cuda"
    providers = {}
    # Triton's CPU interpreter runs minutes per call and its timings mean nothing: fused kernels are GPU-only here.
    for backend in ("triton", "cuda") if on_gpu else ():
        providers[f"fused-{backend}"] = _autograd(
            lambda q, k, v, pos, spec, b=backend: ck.rope_attention(q, k, v, pos, spec, backend=b,
                                                                     check_positions=False))
        providers[f"fused-{backend}-norope"] = _fused_raw(backend, rotate=False)
    if not on_gpu:
        providers["fused-torch-reference"] = _autograd(
            lambda q, k, v, pos, spec: ck.rope_attention(q, k, v, pos, spec, backend="torch"))
    providers["ropeop+sdpa-flash"] = _autograd(
        lambda q, k, v, pos, spec: _sdpa(*ck.apply_rope(q, k, pos, spec, check_positions=False), v, flash=on_gpu))
    providers["hf-rope+sdpa"] = _autograd(_hf_rope_sdpa)
    providers["sdpa-flash-norope"] = _autograd(lambda q, k, v, pos, spec: _sdpa(q, k, v, flash=on_gpu))
    if on_gpu:
        providers["flash-attn"] = _autograd(_flash_attn)
    return providers


def main(argv=None) -> None:
    args = harness.parser(__doc__.splitlines()[0]).parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.smoke:
        head_dim, q_heads, kv_options, seqs, tokens_per_batch = 32, 4, (1, 4), [32, 64], 64
    else:
        head_dim, q_heads, kv_options, tokens_per_batch = 128, 32, (8, 32), TOKENS_PER_BATCH
        seqs = [1024, 4096, 16384, 65536] if args.quick else [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    repeats = args.repeats or (3 if args.smoke else 30)
    spec = ck.RopeSpec.from_params(head_dim, 500000.0, device=device)
    providers = _providers(device)
    results: list[harness.Result] = []
    jobs = [(kv, s, mode) for kv in kv_options for s in seqs for mode in ("fwd", "fwd+bwd")]
    for kv_heads, seq, mode in tqdm(jobs, desc="bench_attention"):
        batch = max(1, tokens_per_batch // seq)
        q = torch.randn(batch, q_heads, seq, head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(batch, kv_heads, seq, head_dim, device=device, dtype=dtype) for _ in range(2))
        pos = torch.arange(seq, device=device).expand(batch, seq)
        flops = 4 * batch * q_heads * seq * seq * head_dim / 2 * (1.0 if mode == "fwd" else 3.5)
        case = {"seq": seq, "batch": batch, "kv_heads": kv_heads, "mode": mode}
        for name, factory in providers.items():
            try:
                fn = factory(q, k, v, pos, spec, mode)
            except Exception as exc:  # a peer that is not installed, or a backend that rejects the shape
                results.append(harness.skipped("attention", name, case, f"{type(exc).__name__}: {exc}"[:200]))
                continue
            results.append(harness.measure("attention", name, case, fn, repeats=repeats, flops=flops,
                                           memory=device == "cuda"))
        del q, k, v
    harness.add_relative(results, "sdpa-flash-norope", "tflops", ("seq", "kv_heads", "mode"),
                         name="pct_of_sdpa_flash")
    for backend in ("triton", "cuda"):  # the cost of RoPE inside: fused time / same kernel without rotation
        harness.add_relative(results, f"fused-{backend}-norope", "ms_p50", ("seq", "kv_heads", "mode"),
                             name=f"pct_of_{backend}_norope_time")
    out = harness.write_report("bench_attention", results,
                               {"dtype": str(dtype), "head_dim": head_dim, "q_heads": q_heads, "causal": True,
                                "tokens_per_batch": tokens_per_batch, "repeats": repeats, "smoke": args.smoke},
                               args.output, x="seq", y="tflops", series=("kv_heads", "mode"),
                               columns=("ms_p50", "ms_p20", "ms_p80", "tflops", "pct_of_sdpa_flash",
                                        "pct_of_triton_norope_time", "pct_of_cuda_norope_time", "peak_mib"))
    print(f"results in {out}")


if __name__ == "__main__":
    main()
