"""RoPE kernel speed against the peers and the bandwidth ceiling (a `copy_` of the same bytes).

LLaMA-7B/8B shapes: head_dim 128, 32 q heads, 8 or 32 kv heads, bf16, 4k-256k tokens, plus one decode token.
Providers: our CUDA and Triton kernels through the public `apply_rope` (checks included) and through their raw
launchers (so the Python overhead is visible at decode sizes), transformers' eager `apply_rotary_pos_emb` with
precomputed cos/sin (the per-layer cost in a model), `torch.compile` of it, Liger-Kernel's and flash-attn's Triton
rotary when installed, and `copy_`. GB/s counts reading and writing q and k once plus the position ids.

    python benchmarks/bench_rope.py            # full sweep on a GPU
    python benchmarks/bench_rope.py --smoke    # seconds, on CPU
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import ctxext_kernels as ck  # noqa: E402
from ctxext_kernels.ops import reference  # noqa: E402


def _hf_apply():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb


def _providers(device: str, smoke: bool):
    """name -> factory(q, k, pos, spec, cos, sin) returning a zero-argument forward callable (or raising to skip)."""
    def ours(backend):
        return lambda q, k, pos, spec, cos, sin: (lambda: ck.apply_rope(q, k, pos, spec, backend=backend,
                                                                        check_positions=False))

    def raw(backend):
        def factory(q, k, pos, spec, cos, sin):
            launcher = {"cuda": "ctxext_kernels.ops.cuda_ext", "triton": "ctxext_kernels.ops.triton_rope",
                        "cpu": "ctxext_kernels.ops.cuda_ext"}[backend]
            rope_forward = __import__(launcher, fromlist=["rope_forward"]).rope_forward
            qc, kc = q.transpose(1, 2), k.transpose(1, 2)
            q_out, k_out = torch.empty_like(qc), torch.empty_like(kc)
            inv_freq = spec.inv_freq.to(q.device)
            return lambda: rope_forward(qc, kc, q_out, k_out, pos, inv_freq, spec.attention_scaling, False, False,
                                        True)
        return factory

    def hf(q, k, pos, spec, cos, sin):
        apply = _hf_apply()
        return lambda: apply(q, k, cos, sin)

    def hf_compiled(q, k, pos, spec, cos, sin):
        apply = torch.compile(_hf_apply())
        return lambda: apply(q, k, cos, sin)

    def liger(q, k, pos, spec, cos, sin):
        from liger_kernel.ops.rope import LigerRopeFunction

        return lambda: LigerRopeFunction.apply(q, k, cos, sin)

    def flash_attn(q, k, pos, spec, cos, sin):
        from flash_attn.layers.rotary import apply_rotary_emb

        half_cos, half_sin = cos[0, :, : cos.shape[-1] // 2], sin[0, :, : sin.shape[-1] // 2]
        qt, kt = q.transpose(1, 2), k.transpose(1, 2)  # it takes [B, S, H, D]
        return lambda: (apply_rotary_emb(qt, half_cos, half_sin), apply_rotary_emb(kt, half_cos, half_sin))

    def copy(q, k, pos, spec, cos, sin):
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        return lambda: (q_out.copy_(q), k_out.copy_(k))

    providers = {"copy": copy, "hf-eager": hf}
    if device == "cuda":
        providers.update({"ctxext-cuda": ours("cuda"), "ctxext-cuda-raw": raw("cuda"),
                          "ctxext-triton": ours("triton"), "ctxext-triton-raw": raw("triton"),
                          "hf-compiled": hf_compiled, "liger": liger, "flash-attn": flash_attn})
    else:
        providers.update({"ctxext-cpu": ours("cpu"), "ctxext-cpu-raw": raw("cpu"), "ctxext-torch": ours("torch")})
        if not smoke:
            providers["hf-compiled"] = hf_compiled
    return providers


def _with_backward(forward, q, k):
    """forward + backward of sum(outputs * 1): the backward of RoPE is one more rotation of the gradients."""
    def run():
        outs = forward()
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        torch.autograd.backward([o for o in outs], [torch.ones_like(o) for o in outs])
        q.grad = k.grad = None
    return run


def main(argv=None) -> None:
    args = harness.parser(__doc__.splitlines()[0]).parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    head_dim, q_heads = (128, 32) if not args.smoke else (64, 4)
    if args.smoke:
        token_counts, kv_options = [1, 256, 1024], (1, 4)
    elif args.quick:
        token_counts, kv_options = [1, 4096, 65536, 262144], (8, 32)
    else:
        token_counts, kv_options = [1, 4096, 16384, 65536, 131072, 262144], (8, 32)
    repeats = args.repeats or (5 if args.smoke else 50)
    spec = ck.RopeSpec.from_params(head_dim, 500000.0, device=device)
    providers = _providers(device, args.smoke)
    results: list[harness.Result] = []
    for kv_heads in kv_options:
        for tokens in token_counts:
            batch, seq = (1, tokens) if tokens <= 8192 else (tokens // 8192, 8192)
            q = torch.randn(batch, seq, q_heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
            k = torch.randn(batch, seq, kv_heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
            pos = torch.arange(seq, device=device).expand(batch, seq)
            cos, sin = ck.rope_cos_sin(pos, spec, dtype=dtype)
            element = q.element_size()
            moved = 2 * (q.numel() + k.numel()) * element + pos.numel() * pos.element_size()
            for mode in ("fwd", "fwd+bwd"):
                case = {"tokens": tokens, "kv_heads": kv_heads, "mode": mode}
                for name, factory in providers.items():
                    if mode == "fwd+bwd" and (name.endswith("-raw") or name == "copy"):
                        continue  # raw launchers and copy have no autograd; the copy ceiling is the same bytes
                    q_in, k_in = (q, k) if mode == "fwd" else (q.detach().requires_grad_(), k.detach().requires_grad_())
                    try:
                        forward = factory(q_in, k_in, pos, spec, cos, sin)
                    except Exception as exc:  # a peer that is not installed or rejects the shape
                        results.append(harness.skipped("rope", name, case, f"{type(exc).__name__}: {exc}"[:200]))
                        continue
                    fn = forward if mode == "fwd" else _with_backward(forward, q_in, k_in)
                    scale = 1 if mode == "fwd" else 2
                    results.append(harness.measure("rope", name, case, fn, repeats=repeats,
                                                   bytes_moved=scale * moved))
            del q, k
    # fwd+bwd moves twice the bytes and is compared with the same copy ceiling
    harness.add_relative(results, "copy", "gbps", ("tokens", "kv_heads"), name="pct_of_copy")
    out = harness.write_report("bench_rope", results, {"dtype": str(dtype), "head_dim": head_dim, "q_heads": q_heads,
                                                       "repeats": repeats, "smoke": args.smoke},
                               args.output, x="tokens", y="gbps", series=("kv_heads", "mode"),
                               columns=("ms_p50", "ms_p20", "ms_p80", "gbps", "pct_of_copy"))
    print(f"results in {out}")


if __name__ == "__main__":
    main()
