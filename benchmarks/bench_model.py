"""Whole-model training step, stock transformers RoPE vs the ctxext patch: forward+backward time, tokens/s, peak memory.

Models, random-initialised (speed and memory depend on the shape, not on the weights; the real SmolLM2 GGUF is 94 MB
and cannot travel to a lent GPU machine): SmolLM2-135M's shape (`harness.SMOLLM2_135M`: 30 layers, hidden 576, 9 q /
3 kv heads of 64) and a stack of `--layers` LLaMA-3-8B-shaped layers (hidden 4096, 32 q / 8 kv heads of 128, MLP
14336). One sequence of 2k-32k tokens per step, longest first; bf16 weights and SDPA attention on GPU (fp32 on CPU);
the optimizer step is the same for both and left out. Both providers run on the same model instance in one process:
`patch()` / `unpatch()` switch between them.

Run: python benchmarks/bench_model.py [--smoke | --quick] [--layers N]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from ctxext_kernels.integrations import patch, unpatch  # noqa: E402

BENCHMARK = "model"
PROVIDERS = {"hf-stock": unpatch, "ctxext-patched": lambda: patch(["llama"])}
MAX_MS = 2000.0  # cap on one measurement's timed loop: a 32k-token step of the 8B-shaped stack takes ~1 s


def training_step(model, input_ids):
    """One forward + backward with the LM loss (gradients freed after, so every call costs the same)."""
    def step():
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def main(argv=None) -> None:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4, help="layers of the 8B-shaped random stack (default 4)")
    args = p.parse_args(argv)
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lengths = [128, 64] if args.smoke else [32768, 8192, 2048] if args.quick else [32768, 16384, 8192, 4096, 2048]
    repeats = args.repeats or (2 if args.smoke else 10)
    if args.smoke:
        models = {"tiny-llama-2L": lambda: harness.random_llama(harness.TINY_LLAMA, dtype=dtype, device=device,
                                                                max_position_embeddings=max(lengths))}
    else:
        models = {
            "smollm2-135m-shape": lambda: harness.random_llama(harness.SMOLLM2_135M, dtype=dtype, device=device,
                                                               max_position_embeddings=max(lengths)),
            f"llama8b-shape-{args.layers}L": lambda: harness.random_llama(
                harness.LLAMA3_8B_LAYER, layers=args.layers, dtype=dtype, device=device,
                max_position_embeddings=max(lengths))}
    cases = {name: [{"model": name, "tokens": n} for n in lengths] for name in models}
    report = harness.Report(
        harness.report_name("bench_model", args),
        {"dtype": str(dtype).removeprefix("torch."), "batch": 1, "repeats": repeats, "max_ms": MAX_MS,
         "attention": "sdpa", "weights": "random", "step": "forward + backward (LM loss), no optimizer"},
        args.output, [(case, provider) for name in models for case in cases[name] for provider in PROVIDERS],
        time_budget=args.time_budget, device=device, x="tokens", y="tokens_per_s", panels=("model",),
        columns=("ms_p50", "tokens_per_s", "peak_mib", "pct_of_stock_time"),
        derive=lambda rows: harness.add_relative(rows, "hf-stock", "ms_p50", ("model", "tokens"),
                                                 "pct_of_stock_time"))
    for model_name, build in models.items():
        if report.expired():
            break
        model = build()
        model.train()
        for case in cases[model_name]:
            input_ids = torch.randint(0, model.config.vocab_size, (1, case["tokens"]), device=device)
            for provider, switch in PROVIDERS.items():
                if report.expired():
                    break
                switch()
                result = harness.measure(BENCHMARK, provider, case, training_step(model, input_ids),
                                         repeats=repeats, warmup=1 if args.smoke else 2, memory=True, device=device,
                                         max_ms=None if args.smoke else MAX_MS)
                if not result.skipped:
                    result.metrics["tokens_per_s"] = case["tokens"] / (result.metrics["ms_p50"] / 1e3)
                report.add(result)
        unpatch()
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    report.finish()


if __name__ == "__main__":
    main()
