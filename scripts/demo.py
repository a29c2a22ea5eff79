"""PoSE demo (README command one): fine-tune the bundled SmolLM2-135M with PoSE on short samples and with full-length
samples for the same steps, and compare both with the untouched model, the rescaled-but-untrained model and the
contiguous control (PoSE's tokens without the position skips): perplexity, passkey accuracy, time per step and the
activation memory of one step.

What it can show on a CPU in minutes, and what it cannot. SmolLM2-135M really handles 8192 tokens, and a CPU cannot
train or evaluate beyond that in minutes, so on a CPU the demo *simulates* a window of --original-window (Lc = 256)
tokens, inside the model's real 8192-token window: RoPE is rescaled linearly to --target-length (Lt = 1024 = 4 x Lc)
and every arm is evaluated at lengths up to Lt, all of them inside the real window. So it shows the mechanics and the
paper's cost claim (PoSE trains Lc-token samples whatever Lt is; full-length fine-tuning trains Lt-token ones), not
context extension: the untouched model already handles every length evaluated. The real-window experiment (SmolLM2
8192 -> 16384 on a GPU) is benchmarks/bench_pose_quality.py, results in benchmarks/results/pose_quality/.
On a GPU the defaults use the model's real window: 8192 -> 32768 tokens (YaRN); perplexity up to 16384 (the
longest documents of the language reference have ~30k tokens), passkey up to 32768.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_pose_vs_full as bench  # noqa: E402

from ctxext_kernels.pose import eval as pose_eval  # noqa: E402
from ctxext_kernels.pose import train as pose_train  # noqa: E402
from ctxext_kernels.pose.data import PYTHON_DOCS  # noqa: E402
from ctxext_kernels.pose.modeling import load_model, select_rope  # noqa: E402

GPU = torch.cuda.is_available()
# (CPU default, GPU default) per setting
DEFAULTS = {
    "original_window": (256, 8192), "target_length": (1024, 32768), "rope_type": ("linear", "yarn"),
    "steps": (16, 30), "global_batch": (2, 8), "lr": (1e-4, 2e-5), "eval_lengths": ("256,1024", "2048,8192,16384"),
    "passkey_lengths": ("1024", "8192,16384,32768"), "trials": (5, 10), "ppl_documents": (2, 4),
}
ARMS = {  # arm: (rescale RoPE, ctxext-train --method or None)
    "untouched": (False, None), "rescaled": (True, None), "pose": (True, "pose"), "contiguous": (True, "contiguous"),
    "full": (True, "full"),
}
ARM_LABELS = {
    "untouched": "untouched model (stock RoPE)", "rescaled": "RoPE rescaled, not trained",
    "pose": "PoSE: Lc-token samples, positions in [0, Lt)", "contiguous": "contiguous control: PoSE's tokens, "
    "positions [0, Lc)", "full": "full-length: Lt-token samples",
}


def build_parser() -> argparse.ArgumentParser:
    def default(name):
        return DEFAULTS[name][GPU]

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder or .gguf (default: the bundled SmolLM2-135M)")
    p.add_argument("--train-data", default=str(PYTHON_DOCS / "library"), help="training text (default: the Python "
                                                                              "library docs)")
    p.add_argument("--eval-data", default=str(PYTHON_DOCS / "reference"),
                   help="held-out evaluation text, all of it read (default: the Python language reference)")
    p.add_argument("--original-window", type=int, default=default("original_window"),
                   help="Lc: PoSE's training sample length, the (simulated) window (default %(default)s)")
    p.add_argument("--target-length", type=int, default=default("target_length"), help="Lt (default %(default)s)")
    p.add_argument("--rope-type", default=default("rope_type"), choices=("linear", "dynamic", "yarn", "llama3"))
    p.add_argument("--arms", default=",".join(ARMS), help="which arms to run, comma-separated (default all)")
    p.add_argument("--steps", type=int, default=default("steps"), help="optimizer steps of every trained arm")
    p.add_argument("--global-batch", type=int, default=default("global_batch"))
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--lr", type=float, default=default("lr"))
    p.add_argument("--max-documents", type=int, default=64, help="training documents to tokenize")
    p.add_argument("--eval-lengths", default=default("eval_lengths"), help="perplexity lengths")
    p.add_argument("--passkey-lengths", default=default("passkey_lengths"), help="passkey lengths ('' to skip)")
    p.add_argument("--trials", type=int, default=default("trials"), help="passkey prompts per length")
    p.add_argument("--ppl-documents", type=int, default=default("ppl_documents"))
    p.add_argument("--stride", type=int, default=256, help="perplexity sliding-window stride")
    p.add_argument("--no-step-cost", action="store_true",
                   help="skip measuring one PoSE and one full-length step at Lt (time, activation memory)")
    p.add_argument("--output", type=Path, default=ROOT / "runs" / "demo",
                   help="where the trained models and the results go (default %(default)s)")
    return p


def lengths_of(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def evaluate(model, tokenizer, documents, args, label: str) -> dict:
    started = time.perf_counter()
    model.eval()
    result = {"ppl": pose_eval.perplexity_by_length(model, documents, lengths_of(args.eval_lengths), args.stride,
                                                    tokenizer.bos_token_id),
              "passkey": pose_eval.passkey_accuracy(model, tokenizer, lengths_of(args.passkey_lengths), args.trials)}
    print(f"[demo] {label}: evaluated in {time.perf_counter() - started:.0f} s: " + ", ".join(
        [f"ppl@{r['length']}={r['perplexity']:.2f}" for r in result["ppl"]]
        + [f"passkey@{r['length']}={r['accuracy']:.0%}" for r in result["passkey"]]), flush=True)
    return result


def train(model, tokenizer, method: str, args, factor: float) -> dict:
    """Fine-tune `model` in place with ctxext-train's `method`; its wall time per step and its loss curve."""
    folder = args.output / method
    train_args = pose_train.build_parser().parse_args([
        "--model", str(args.model), "--data", args.train_data, "--output", str(folder), "--method", method,
        "--original-window", str(args.original_window), "--target-length", str(args.target_length), "--rope-type",
        args.rope_type, "--rope-factor", str(factor), "--trained-window", str(args.original_window), "--steps",
        str(args.steps), "--global-batch", str(args.global_batch), "--micro-batch", str(args.micro_batch), "--lr",
        str(args.lr), "--warmup-steps", str(min(10, args.steps // 4)), "--max-documents", str(args.max_documents),
        "--checkpoint-every", "0", "--resume", "never", "--quiet", *(["--gradient-checkpointing"] if GPU else [])])
    started = time.perf_counter()
    pose_train.train(train_args, model, tokenizer)
    seconds = time.perf_counter() - started
    losses = [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    print(f"[demo] {method}: {args.steps} steps in {seconds:.0f} s ({seconds / args.steps:.1f} s/step incl. set-up), "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
    return {"train_seconds": seconds, "losses": losses}


def table(results: dict, args, real_window: int) -> str:
    def where(length):
        if length <= args.original_window:
            return "≤ Lc"
        return "> Lc, inside the real window" if length <= real_window else "beyond the real window"

    ppl_lengths, passkey_lengths = lengths_of(args.eval_lengths), lengths_of(args.passkey_lengths)
    head = ([f"ppl {n} ({where(n)})" for n in ppl_lengths] + [f"passkey {n} ({where(n)})" for n in passkey_lengths]
            + ["train s/step (incl. set-up)"])
    lines = ["| arm | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for arm, result in results.items():
        cells = ([f"{r['perplexity']:.2f}" for r in result["ppl"]] + [f"{r['accuracy']:.0%}" for r in result["passkey"]]
                 + [f"{result['train_seconds'] / args.steps:.1f}" if "train_seconds" in result else "-"])
        lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reading_note(args, real_window: int) -> str:
    """What the table cannot show when every evaluated length lies inside the model's real window ('' otherwise)."""
    if max(lengths_of(args.eval_lengths) + lengths_of(args.passkey_lengths)) > real_window:
        return ""
    return (f"\n\nEvery length here is inside the model's real {real_window}-token window: the table compares the "
            "arms' fine-tuning (same steps, same samples per step) and their cost, it does not show an extension "
            "beyond the real window (see benchmarks/bench_pose_quality.py). Part of any perplexity change is "
            "adaptation to the training text's domain, shared by all trained arms.")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    arms = args.arms.split(",")
    if unknown := set(arms) - set(ARMS):
        raise SystemExit(f"--arms: unknown arm(s) {sorted(unknown)}; choose from {list(ARMS)}")
    wall = time.perf_counter()
    args.model = str(args.model or bench.smollm2_path())
    device = "cuda" if GPU else "cpu"
    factor = args.target_length / args.original_window
    stock, tokenizer = load_model(args.model, device=device)
    real_window = stock.config.max_position_embeddings
    simulated = args.original_window < real_window
    print(f"[demo] device: {device}; model: {Path(args.model).name} (real window {real_window} tokens)\n"
          f"[demo] Lc = {args.original_window} ("
          f"{'a simulated window, inside the real one' if simulated else 'the real window'}), Lt = "
          f"{args.target_length}; RoPE rescaled {args.rope_type} x{factor:g} for every arm but 'untouched'; "
          f"each trained arm: {args.steps} steps x {args.global_batch} samples (lr {args.lr:g}) on {args.train_data}",
          flush=True)
    documents = pose_eval.load_eval_documents(args.eval_data, tokenizer, max(lengths_of(args.eval_lengths)),
                                              args.ppl_documents, split="all")
    print(f"[demo] perplexity: {len(documents)} documents of {args.eval_data} (not trained on), first "
          f"{max(lengths_of(args.eval_lengths))} tokens each, BOS per window, stride {args.stride}; passkey: "
          f"{args.trials} prompts per length, random depths", flush=True)

    # loaded once (a .gguf takes a while to unpack); every trained arm starts from the same rescaled weights
    model = load_model(args.model, rope_type=args.rope_type, target_length=args.target_length, rope_factor=factor,
                       trained_window=args.original_window, device=device)[0]
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    results, costs = {}, []
    for arm in arms:
        rescale, method = ARMS[arm]
        if rescale:
            model.load_state_dict(initial)
        print(f"[demo] {arm}: RoPE {select_rope(model if rescale else stock, kernels=True)}", flush=True)
        trained = train(model, tokenizer, method, args, factor) if method else {}
        results[arm] = {**evaluate(model if rescale else stock, tokenizer, documents, args, arm), **trained}
    if not args.no_step_cost:
        print(f"[demo] one training step (forward+backward, 1 sample) at Lt={args.target_length}: PoSE trains "
              f"{args.original_window} tokens, full-length {args.target_length}; memory = "
              + ("peak GPU memory" if GPU else "activations saved for backward"), flush=True)
        model.load_state_dict(initial)
        model.config.use_cache = False
        costs = bench.cost_sweep(model, args.original_window, [args.target_length], samples=1,
                                 repeats=1 if not GPU else 3,
                                 progress=lambda line: print(f"[demo]   {line}", flush=True))

    summary = table(results, args, real_window) + reading_note(args, real_window)
    print("\n" + summary + "\n")
    seconds = time.perf_counter() - wall
    print(f"[demo] demo wall time (without set-up): {seconds:.0f} s ({seconds / 60:.1f} min)")
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "demo_results.json").write_text(json.dumps({
        "settings": {k: str(v) for k, v in vars(args).items()}, "device": device, "real_window": real_window,
        "arms": results, "wall_seconds": seconds,
        "step_costs": [{"method": r.provider, **r.case, **r.metrics, "skipped": r.skipped} for r in costs]},
        indent=1))
    (args.output / "demo_results.md").write_text(summary + "\n")


if __name__ == "__main__":
    main()
