"""`ctxext-eval passkey|ppl`: passkey retrieval and sliding-window perplexity at several context lengths.

passkey: the template of Mohtashami & Jaggi (2023) that the PoSE paper uses: a random 5-digit key hidden at a random
depth (uniform in [0, 1], seeded; or the fixed --depths) inside repeated filler text; the answer is greedy decoding of
up to 8 tokens, correct when its first number is the key. The prompt is `length - 8` tokens, so prompt and answer fit
in `length`.
ppl: sliding-window perplexity (stride S, default 1024 as in the paper) over long documents, each cut to --max-tokens
(default the longest length): every evaluated length scores the same tokens, so the numbers compare across lengths.
Every window starts with the tokenizer's BOS when it has one (--no-bos to leave it out), as the PoSE authors' code
does. By default only the held-out documents are read (`is_heldout`: a fixed 1 in 10 by content hash), the ones a
training run on the same data leaves out to keep evaluation text unseen; --split all reads every document.

Both write `<task>.json` (results + settings) and `<task>.md` into --output after every length (a failure at a later
length keeps the earlier results), and `<task>.png` at the end when matplotlib is installed. Every argument is checked
before the model loads. A .gguf or folder model, with `--rope-type/--rope-factor` to try training-free RoPE scaling on
a model that has none (a model whose config already scales RoPE, e.g. one `ctxext-train` extended, is refused: the
flags would replace its trained scaling).

Example::

    ctxext-eval passkey --model out/ --lengths 2048,4096,8192 --trials 10 --output eval/
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import sys
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import is_heldout, python_docs_path, read_texts, tokenize_documents
from .cli import (EXTRA_HINT, atomic_write_text, check_output_folder, disk_space_errors, fraction_list, length_list,
                  non_negative_int, output_lock, positive_int, rope_factor, run_cli, settings_record, warn)
from .modeling import ROPE_TYPES, load_model, rope_base_parameters, select_rope, split_model_path

PROG = "ctxext-eval"

TASK_DESCRIPTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                    "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
ANSWER_TOKENS = 8  # greedy tokens generated per passkey prompt: the 5-digit key and a little slack


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
def greedy_answer(model, input_ids: torch.Tensor, max_new_tokens: int = ANSWER_TOKENS) -> list[int]:
    """Greedy continuation token ids of one prompt `[S]`, decoded with the KV cache."""
    device = next(model.parameters()).device
    generated = model.generate(input_ids[None].to(device), attention_mask=torch.ones_like(input_ids[None]).to(device),
                               max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                               pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None else
                               model.config.pad_token_id)
    return generated[0, input_ids.numel():].tolist()


def passkey_accuracy(model, tokenizer, lengths, trials: int, depths=None, seed: int = 0,
                     progress: bool = True) -> list[dict]:
    """Accuracy per length: `trials` prompts per length, keys random, depths random (or cycling through `depths`)."""
    generator = torch.Generator().manual_seed(seed)
    return [passkey_at_length(model, tokenizer, length, trials, depths, generator, progress) for length in lengths]


def passkey_at_length(model, tokenizer, length: int, trials: int, depths, generator: torch.Generator,
                      progress: bool = True) -> dict:
    """Accuracy of `trials` prompts of `length - ANSWER_TOKENS` tokens, so the prompt and the greedy answer fit in
    `length` (keys drawn from `generator`; depths uniform in [0, 1] from `generator` when `depths` is None, as the
    PoSE authors draw them, else cycling through the fixed `depths`)."""
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    hits, trial_depths, per_depth = 0, [], {}
    for trial in tqdm(range(trials), desc=f"passkey {length}", disable=not progress, leave=False):
        key = int(torch.randint(10000, 100000, (1,), generator=generator))
        depth = float(torch.rand((), generator=generator, dtype=torch.float64)) if depths is None else \
            depths[trial % len(depths)]
        prompt, _ = passkey_prompt(tokenizer, key, length - ANSWER_TOKENS, depth)
        answer = tokenizer.decode(greedy_answer(model, prompt), skip_special_tokens=True)
        number = re.search(r"\d+", answer)
        correct = number is not None and number.group() == str(key)
        hits += correct
        trial_depths.append(round(depth, 4))
        per_depth.setdefault(str(depth), []).append(int(correct))
    result = {"length": length, "accuracy": hits / trials, "trials": trials,
              "prompt_tokens": length - ANSWER_TOKENS, "depths": trial_depths}
    if depths is not None:
        result["accuracy_by_depth"] = {d: sum(v) / len(v) for d, v in per_depth.items()}
    return result


@torch.no_grad()
def sliding_window_nll(model, tokens: torch.Tensor, window: int, stride: int,
                       bos_token_id: int | None = None) -> tuple[float, int]:
    """Summed negative log-likelihood and number of scored tokens of one document under a sliding window.

    Windows of `window` tokens start every `stride` document tokens; each window scores only the tokens no earlier
    window scored. With `bos_token_id`, every window is that BOS followed by `window - 1` document tokens (the PoSE
    authors' eval_ppl.py): every token is scored once (with stride == window - 1, the first of each window from BOS
    alone). Without, windows hold `window` document tokens and the document's first token is not scored (nor, with
    stride == window, the first of every window).

    Parameters
    ----------
    tokens : torch.Tensor
        `[N]` token ids, without BOS.
    """
    prefix = [] if bos_token_id is None else [bos_token_id]
    span = window - len(prefix)  # document tokens per window
    if stride < 1 or stride > span:
        raise ValueError(f"stride must be in [1, {span}] (the window's document tokens), got {stride}")
    device = next(model.parameters()).device
    prefix = torch.tensor(prefix, dtype=tokens.dtype)
    total, count, scored_until = 0.0, 0, 0
    for begin in range(0, tokens.numel(), stride):
        end = min(begin + span, tokens.numel())
        ids = torch.cat([prefix, tokens[begin:end]]).to(device)[None]
        logits = model(ids, position_ids=torch.arange(ids.shape[1], device=device)[None]).logits[0, :-1]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 log-softmax loses digits
        # document token t sits at ids index t - begin + len(prefix) and is predicted one position earlier; score the
        # tokens in [first, end) that no earlier window scored (with no prefix, t = begin has no prediction)
        first = max(scored_until, begin + 1 - prefix.numel())
        predictions = logits[first - begin + prefix.numel() - 1:]
        nll = torch.nn.functional.cross_entropy(predictions, tokens[first:end].to(device), reduction="sum")
        total += float(nll)
        count += end - first
        scored_until = end
        if end == tokens.numel():
            break
    return total, count


def perplexity_by_length(model, documents, lengths, stride: int, bos_token_id: int | None = None,
                         max_tokens: int | None = None, progress: bool = True) -> list[dict]:
    """Perplexity per window length over the same tokens: every document cut to `max_tokens` (default
    `max(lengths)`) tokens."""
    documents = [document[:max_tokens or max(lengths)] for document in documents]
    return [perplexity_at_length(model, documents, length, stride, bos_token_id, progress) for length in lengths]


def perplexity_at_length(model, documents, length: int, stride: int, bos_token_id: int | None = None,
                         progress: bool = True) -> dict:
    """Sliding-window perplexity with windows of `length` tokens (BOS included when given; stride at most the
    window's document tokens) over `documents`."""
    span = length - (bos_token_id is not None)
    total, count = 0.0, 0
    for document in tqdm(documents, desc=f"ppl {length}", disable=not progress, leave=False):
        nll, n = sliding_window_nll(model, document, length, min(stride, span), bos_token_id)
        total, count = total + nll, count + n
    if count == 0:
        raise ValueError(f"no token was scored at length {length}: the documents need at least 2 tokens")
    return {"length": length, "perplexity": math.exp(total / count), "nll": total / count, "scored_tokens": count,
            "documents": len(documents)}


def write_results(output: Path, task: str, results: list[dict], settings: dict, lengths: list[int]) -> None:
    """`<task>.json` and `<task>.md` in `output`, each replaced whole: the results of the lengths done so far."""
    metric = "accuracy" if task == "passkey" else "perplexity"
    complete = len(results) == len(lengths)
    atomic_write_text(output / f"{task}.json", json.dumps(
        {"task": task, "complete": complete, "settings": settings, "results": results}, indent=1))
    rows = [f"| {r['length']} | {r[metric]:.4g} |" for r in results]
    status = [] if complete else ["", f"Incomplete: {len(results)} of {len(lengths)} lengths evaluated."]
    atomic_write_text(output / f"{task}.md", "\n".join([
        f"# {task}: {settings.get('model')}", "", f"Settings: {json.dumps(settings)}", *status, "",
        f"| length | {metric} |", "|---|---|", *rows]) + "\n")


def write_plot(output: Path, task: str, results: list[dict], settings: dict) -> None:
    """`<task>.png`: the metric against the length (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "accuracy" if task == "passkey" else "perplexity"
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["length"] for r in results], [r[metric] for r in results], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(metric)
    ax.set_title(f"{task} — {Path(str(settings.get('model'))).name}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    try:
        with disk_space_errors(output):
            fig.savefig(output / f"{task}.png", dpi=110)
    finally:
        plt.close(fig)


def load_eval_documents(data, tokenizer, min_tokens: int, count: int, field: str = "text",
                        split: str = "heldout") -> list[torch.Tensor]:
    """Up to `count` documents of at least `min_tokens` tokens (default text: the Python docs); with split
    "heldout" only those `is_heldout` picks, with "all" every document."""
    if split not in ("heldout", "all"):
        raise ValueError(f"split must be 'heldout' or 'all', got {split!r}")
    texts = read_texts(data or python_docs_path(), field)
    if split == "heldout":
        texts = filter(is_heldout, texts)
    documents, _ = tokenize_documents(texts, tokenizer, min_tokens, count, progress=False)
    return documents


def check_rope_override(model: str, rope_type: str | None, rope_factor: float | None) -> None:
    """Refuse --rope-type/--rope-factor on a model whose config already scales RoPE: applying them would replace the
    scaling the model was trained with (e.g. a linear factor-2 model evaluated at factor 1)."""
    if rope_type is None and rope_factor is None:
        return
    from transformers import AutoConfig

    folder, kwargs = split_model_path(model)
    parameters = rope_base_parameters(AutoConfig.from_pretrained(folder, **kwargs))
    scaling = parameters.get("rope_type", parameters.get("type", "default"))
    if scaling != "default":
        raise ValueError(f"--rope-type/--rope-factor: {model} already scales RoPE ({scaling}, factor "
                         f"{parameters.get('factor')}); evaluate it without these flags, they would replace that "
                         "scaling")
    if rope_type is None:
        raise ValueError("--rope-factor needs --rope-type")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=("passkey", "ppl"))
    p.add_argument("--model", required=True, help="transformers model folder or .gguf file")
    p.add_argument("--lengths", required=True, type=length_list,
                   help="comma-separated context lengths, e.g. 2048,4096,8192")
    p.add_argument("--output", type=Path, required=True, help="folder for the JSON, markdown and PNG")
    p.add_argument("--trials", type=positive_int, default=10, help="passkey prompts per length")
    p.add_argument("--depths", type=fraction_list, default=None,
                   help="fixed passkey depths in [0, 1], cycled (default: uniform random per prompt, seeded)")
    p.add_argument("--data", default=None, help="ppl documents (default: the Python 3.11 docs)")
    p.add_argument("--field", default="text", help="ppl: the text field of .jsonl/.parquet/datasets (GovReport: input)")
    p.add_argument("--split", choices=("heldout", "all"), default="heldout",
                   help="ppl: evaluate only the held-out 1-in-10 documents (`is_heldout`, default) or all")
    p.add_argument("--documents", type=positive_int, default=4, help="ppl: documents to evaluate")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="ppl: tokens scored per document (documents cut to this; default the longest length)")
    p.add_argument("--stride", type=positive_int, default=1024, help="ppl: sliding-window stride (paper: 1024)")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=True,
                   help="ppl: start every window with the tokenizer's BOS when it has one (default on)")
    p.add_argument("--rope-type", choices=ROPE_TYPES, default=None, help="training-free RoPE scaling to apply")
    p.add_argument("--rope-factor", type=rope_factor, default=None)
    p.add_argument("--trained-window", type=positive_int, default=None)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--no-kernels", action="store_true", help="keep stock transformers RoPE")
    p.add_argument("--debug", action="store_true", help="on an error, show the traceback")
    return p


def evaluate(args) -> Path:
    """Run `ctxext-eval` for parsed `args`: check everything, then write the results after every length."""
    check_output_folder(args.output)
    split_model_path(args.model)
    if args.max_tokens is not None and args.max_tokens < max(args.lengths):
        raise ValueError(f"--max-tokens {args.max_tokens} is below the longest length {max(args.lengths)}")
    check_rope_override(args.model, args.rope_type, args.rope_factor)
    data = None if args.task == "passkey" else args.data or python_docs_path()
    if data is not None and not Path(data).exists():
        raise FileNotFoundError(f"--data {data} does not exist")
    plot = importlib.util.find_spec("matplotlib") is not None
    if not plot:
        warn(PROG, f"matplotlib is not installed: no {args.task}.png ({EXTRA_HINT})")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with output_lock(args.output, PROG):
        model, tokenizer = load_model(args.model, rope_type=args.rope_type, target_length=max(args.lengths),
                                      rope_factor=args.rope_factor, trained_window=args.trained_window, dtype=dtype,
                                      device=device)
        model.eval()
        kernels = select_rope(model, kernels=not args.no_kernels)
        if args.task == "passkey":
            for length in args.lengths:  # a too-short length fails here, before any prompt is evaluated
                try:
                    passkey_prompt(tokenizer, 10000, length - ANSWER_TOKENS, 0.0)
                except ValueError:
                    raise ValueError(f"length {length} is too short for the passkey template and its "
                                     f"{ANSWER_TOKENS}-token answer") from None
            generator = torch.Generator().manual_seed(args.seed)
            measure = partial(passkey_at_length, model, tokenizer, trials=args.trials, depths=args.depths,
                              generator=generator)
        else:
            max_tokens = args.max_tokens or max(args.lengths)
            documents = [d[:max_tokens] for d in load_eval_documents(data, tokenizer, max(args.lengths),
                                                                     args.documents, args.field, args.split)]
            if len(documents) < args.documents:
                warn(PROG, f"only {len(documents)} of --documents {args.documents} ({args.split} split) have "
                           f"{max(args.lengths)} tokens")
            bos = tokenizer.bos_token_id if args.bos else None
            if args.bos and bos is None:
                warn(PROG, "the tokenizer has no BOS token: windows start with document text")
            measure = partial(perplexity_at_length, model, documents, stride=args.stride, bos_token_id=bos)
        # passkey prompts always start with the tokenizer's BOS when it has one; ppl windows unless --no-bos
        settings = {**settings_record(args), "device": device, "dtype": str(dtype), "rope": kernels,
                    "bos_token_id": tokenizer.bos_token_id if args.task == "passkey" or args.bos else None}
        results = []
        for length in args.lengths:
            results.append(measure(length))
            write_results(args.output, args.task, results, settings, args.lengths)
            print(json.dumps(results[-1]), flush=True)
        if plot:
            write_plot(args.output, args.task, results, settings)
    print(f"[{PROG}] wrote {args.output}/{args.task}.json|md{'|png' if plot else ''}", file=sys.stderr)
    return args.output


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_cli(PROG, lambda: evaluate(args), args.debug)


if __name__ == "__main__":
    main()
