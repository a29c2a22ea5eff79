"""`ctxext-eval passkey|ppl`: passkey retrieval and sliding-window perplexity at several context lengths.

passkey: the template of Mohtashami & Jaggi (2023) that the PoSE paper uses: a random 5-digit key hidden at a chosen
depth inside repeated filler text; the answer is greedy decoding, correct when its first number is the key.
ppl: sliding-window perplexity (stride S) over long documents: every evaluated length scores the same tokens (each
document cut to the longest length), so the numbers compare across lengths.

Both write `<task>.json` (results + settings), `<task>.md` and `<task>.png` into --output. A .gguf or folder model,
with `--rope-type/--rope-factor` to try training-free RoPE scaling on it.

Example::

    ctxext-eval passkey --model out/ --lengths 2048,4096,8192 --trials 10 --output eval/
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import python_docs_path, read_texts, tokenize_documents
from .modeling import ROPE_TYPES, load_model, select_rope

TASK_DESCRIPTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                    "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def key_line(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def passkey_prompt(tokenizer, key: int, length: int, depth: float) -> tuple[torch.Tensor, int]:
    """A passkey prompt of exactly `length` tokens with the key line after `depth` of the filler.

    The prompt is assembled from token ids (task, filler stream, key line, rest of the filler stream, question), so
    its length is exact whatever the tokenizer merges at the joins.

    Returns
    -------
    input_ids : torch.Tensor
        `[length]` int64 (with the tokenizer's BOS first when it has one).
    key_start : int
        Index of the key line's first token.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    head = bos + _ids(tokenizer, TASK_DESCRIPTION)
    key_ids = _ids(tokenizer, " " + key_line(key))
    tail = _ids(tokenizer, " " + QUESTION)
    filler_tokens = length - len(head) - len(key_ids) - len(tail)
    if filler_tokens < 0:
        raise ValueError(f"length {length} is too short for the passkey template ({length - filler_tokens} tokens "
                         "without filler)")
    unit = _ids(tokenizer, " " + FILLER)
    stream = (unit * (filler_tokens // len(unit) + 1))[:filler_tokens]
    before = round(depth * filler_tokens)
    ids = head + stream[:before] + key_ids + stream[before:] + tail
    return torch.tensor(ids, dtype=torch.long), len(head) + before


@torch.no_grad()
def greedy_answer(model, input_ids: torch.Tensor, max_new_tokens: int = 8) -> list[int]:
    """Greedy continuation token ids of one prompt `[S]`, decoded with the KV cache."""
    device = next(model.parameters()).device
    generated = model.generate(input_ids[None].to(device), attention_mask=torch.ones_like(input_ids[None]).to(device),
                               max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                               pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None else
                               model.config.pad_token_id)
    return generated[0, input_ids.numel():].tolist()


def passkey_accuracy(model, tokenizer, lengths, trials: int, depths=DEFAULT_DEPTHS, seed: int = 0,
                     progress: bool = True) -> list[dict]:
    """Accuracy per length: `trials` prompts per length, keys random, depths cycling through `depths`."""
    generator = torch.Generator().manual_seed(seed)
    results = []
    for length in lengths:
        hits, per_depth = 0, {}
        for trial in tqdm(range(trials), desc=f"passkey {length}", disable=not progress, leave=False):
            key = int(torch.randint(10000, 100000, (1,), generator=generator))
            depth = depths[trial % len(depths)]
            prompt, _ = passkey_prompt(tokenizer, key, length, depth)
            answer = tokenizer.decode(greedy_answer(model, prompt), skip_special_tokens=True)
            number = re.search(r"\d+", answer)
            correct = number is not None and number.group() == str(key)
            hits += correct
            per_depth.setdefault(str(depth), []).append(int(correct))
        results.append({"length": length, "accuracy": hits / trials, "trials": trials,
                        "accuracy_by_depth": {d: sum(v) / len(v) for d, v in per_depth.items()}})
    return results


@torch.no_grad()
def sliding_window_nll(model, tokens: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """Summed negative log-likelihood and number of scored tokens of one document under a sliding window.

    Windows of `window` tokens start every `stride` tokens; each window scores only the tokens no earlier window
    scored, so with stride < window every token after the first is scored once, with up to `window - 1` tokens of
    context (with stride == window the first token of each window has no context and is not scored).

    Parameters
    ----------
    tokens : torch.Tensor
        `[N]` token ids.
    """
    if stride < 1 or stride > window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    device = next(model.parameters()).device
    total, count, scored_until = 0.0, 0, 0
    for begin in range(0, tokens.numel(), stride):
        end = min(begin + window, tokens.numel())
        ids = tokens[begin:end].to(device)[None]
        logits = model(ids, position_ids=torch.arange(end - begin, device=device)[None]).logits[0, :-1]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 log-softmax loses digits
        # the prediction for token t comes from position t-1; score tokens in (scored_until, end) not yet scored
        first = max(scored_until, begin + 1) - begin
        nll = torch.nn.functional.cross_entropy(logits[first - 1:], ids[0, first:], reduction="sum")
        total += float(nll)
        count += end - begin - first
        scored_until = end
        if end == tokens.numel():
            break
    return total, count


def perplexity_by_length(model, documents, lengths, stride: int, progress: bool = True) -> list[dict]:
    """Perplexity per window length over the same tokens: every document cut to `max(lengths)` tokens."""
    longest = max(lengths)
    results = []
    for length in lengths:
        total, count = 0.0, 0
        for document in tqdm(documents, desc=f"ppl {length}", disable=not progress, leave=False):
            nll, n = sliding_window_nll(model, document[:longest], length, min(stride, length))
            total, count = total + nll, count + n
        results.append({"length": length, "perplexity": math.exp(total / count), "nll": total / count,
                        "scored_tokens": count, "documents": len(documents)})
    return results


def write_report(output: Path, task: str, results: list[dict], settings: dict) -> Path:
    """`<task>.json`, `<task>.md` and `<task>.png` (metric against length) in `output`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "accuracy" if task == "passkey" else "perplexity"
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{task}.json").write_text(json.dumps({"task": task, "settings": settings, "results": results},
                                                    indent=1))
    rows = [f"| {r['length']} | {r[metric]:.4g} |" for r in results]
    (output / f"{task}.md").write_text("\n".join([f"# {task}: {settings.get('model')}", "",
                                                  f"Settings: {json.dumps(settings)}", "", f"| length | {metric} |",
                                                  "|---|---|", *rows]) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["length"] for r in results], [r[metric] for r in results], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(metric)
    ax.set_title(f"{task} — {Path(str(settings.get('model'))).name}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(output / f"{task}.png", dpi=110)
    plt.close(fig)
    return output


def load_eval_documents(data, tokenizer, min_tokens: int, count: int) -> list[torch.Tensor]:
    """Up to `count` documents of at least `min_tokens` tokens (default text: the Python docs)."""
    documents, _ = tokenize_documents(read_texts(data or python_docs_path()), tokenizer, min_tokens, count,
                                      progress=False)
    return documents


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctxext-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=("passkey", "ppl"))
    p.add_argument("--model", required=True, help="transformers model folder or .gguf file")
    p.add_argument("--lengths", required=True, help="comma-separated context lengths, e.g. 2048,4096,8192")
    p.add_argument("--output", type=Path, required=True, help="folder for the JSON, markdown and PNG")
    p.add_argument("--trials", type=int, default=10, help="passkey prompts per length")
    p.add_argument("--depths", default=",".join(map(str, DEFAULT_DEPTHS)), help="passkey depths in [0, 1]")
    p.add_argument("--data", default=None, help="ppl documents (default: the Python 3.11 docs)")
    p.add_argument("--documents", type=int, default=4, help="ppl: documents to evaluate")
    p.add_argument("--stride", type=int, default=256, help="ppl: sliding-window stride")
    p.add_argument("--rope-type", choices=ROPE_TYPES, default=None, help="training-free RoPE scaling to apply")
    p.add_argument("--rope-factor", type=float, default=None)
    p.add_argument("--trained-window", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-kernels", action="store_true", help="keep stock transformers RoPE")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, tokenizer = load_model(args.model, rope_type=args.rope_type, target_length=max(lengths),
                                  rope_factor=args.rope_factor, trained_window=args.trained_window, dtype=dtype,
                                  device=device)
    model.eval()
    kernels = select_rope(model, kernels=not args.no_kernels)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings.update(device=device, dtype=str(dtype), rope=kernels)
    if args.task == "passkey":
        depths = tuple(float(d) for d in args.depths.split(","))
        results = passkey_accuracy(model, tokenizer, lengths, args.trials, depths, args.seed)
    else:
        documents = load_eval_documents(args.data, tokenizer, max(lengths), args.documents)
        results = perplexity_by_length(model, documents, lengths, args.stride)
    write_report(args.output, args.task, results, settings)
    for r in results:
        print(json.dumps(r))
    print(f"[ctxext-eval] wrote {args.output}/{args.task}.json|md|png", file=sys.stderr)


if __name__ == "__main__":
    main()
