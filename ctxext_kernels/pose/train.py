"""`ctxext-train`: PoSE (or full-length / RandPos) fine-tuning of a RoPE causal LM to a longer context.

A thin loop on plain PyTorch + transformers: AdamW, the learning rate warmed up linearly then decayed linearly to 0 at
the last step (the authors' recipe, transformers' `get_linear_schedule_with_warmup`: lr 2e-5, 10 warm-up steps, global
batch 64, 1000 steps; `--schedule constant` holds it after the warm-up instead), gradient accumulation, bf16 autocast
on GPU, optional gradient checkpointing, DDP or FSDP2 (`fully_shard`) under torchrun. Every sample starts with the
BOS token the tokenizer adds, at position 0. The result is a transformers model folder with the new RoPE scaling.

Reliability: every setting is checked before the model loads; one run at a time owns --output (OUTPUT/.lock).
Checkpoints (see `checkpoint.py`) hold everything a resumed run needs to continue bit for bit, carry SHA-256 sums and
are renamed into place only when complete; resuming refuses changed settings that decide the result (naming them) and
other training data (by the token stream's SHA-256), and falls back to the previous checkpoint when the newest is
corrupt. A non-finite loss or gradient stops the run before the optimizer step. The final model is written into a
temporary folder and moved into OUTPUT, pose_training.json last; a full disk is reported as "no space left on <path>"
and leaves no partial files behind.

Example::

    ctxext-train --model SmolLM2.gguf --data docs/ --output out --original-window 2048 --target-length 16384
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import (Checkpoint, CheckpointError, checkpoint_folders, newest_checkpoint, save_checkpoint,
                         verify_checkpoint)
from .cli import (TEMPORARY_PREFIX, atomic_write_text, check_output_folder, context_length, disk_space_errors,
                  fsync_folder, non_negative_float, non_negative_int, output_lock, positive_float, positive_int,
                  rope_factor, run_cli, settings_record, warn)
from .data import DocumentStream, fingerprint, is_heldout, python_docs_path, read_texts, tokenize_documents
from .modeling import ROPE_TYPES, describe_rope_scaling, leading_bos, load_model, select_rope, split_model_path
from .sampler import CHUNK_LENGTH_RULES, CONTENT_STRATEGIES, METHODS, PoseCollator, PoseSampler

PROG = "ctxext-train"
# settings that decide what a step computes: a resumed run must keep them (it is refused otherwise, naming them);
# every other setting may change on resume and each stretch of the run is recorded with its own settings
RESUME_MUST_MATCH = ("method", "original_window", "target_length", "num_chunks", "content", "chunk_lengths",
                     "rope_type", "rope_factor", "trained_window", "lr", "schedule", "warmup_steps", "weight_decay",
                     "max_grad_norm", "global_batch", "micro_batch", "seed", "lora_rank", "lora_alpha")
# config entries that name a file or a run-time switch rather than the model
VOLATILE_CONFIG_KEYS = ("transformers_version", "use_cache", "dtype", "torch_dtype", "output_attentions",
                        "output_hidden_states", "return_dict")
SCHEDULES = ("linear", "constant")
RECORD_FILE = "pose_training.json"  # written last into OUTPUT: present only when the whole model is
LORA_OUTPUTS = ("merged", "adapter")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="transformers model folder or .gguf file")
    p.add_argument("--data", default=None,
                   help="training text: .txt/.jsonl/.parquet file, a folder of text files or a datasets folder "
                        "(default: the Python 3.11 docs, package python3.11-doc)")
    p.add_argument("--output", required=True, type=Path, help="output model folder (checkpoints/ and metrics.jsonl "
                                                               "go inside)")
    p.add_argument("--method", choices=METHODS, default="pose")
    p.add_argument("--original-window", type=positive_int, required=True, help="Lc: training sequence length")
    p.add_argument("--target-length", type=context_length, required=True,
                   help="Lt: context length to extend to (at most 2^24)")
    p.add_argument("--num-chunks", type=positive_int, default=2)
    p.add_argument("--content", choices=CONTENT_STRATEGIES, default="random")
    p.add_argument("--chunk-lengths", choices=CHUNK_LENGTH_RULES, default="paper",
                   help="how PoSE cuts Lc into chunks: paper = a uniformly random composition (the paper's appendix; "
                        "the default, since it is the published method), authors = their released code's two-chunk "
                        "rule l_0 ~ U{1..ceil(Lc/2)}, which puts 3/4 of the tokens in the skipped chunk")
    p.add_argument("--rope-type", choices=ROPE_TYPES, default="linear")
    p.add_argument("--rope-factor", type=rope_factor, default=None,
                   help="RoPE scale factor >= 1 (default: target length / the model's trained window)")
    p.add_argument("--trained-window", type=positive_int, default=None,
                   help="the context the model was trained on (default: its max_position_embeddings)")
    p.add_argument("--lr", type=positive_float, default=2e-5)
    p.add_argument("--schedule", choices=SCHEDULES, default="linear",
                   help="learning rate after the warm-up: linear = decay to 0 at the last step (the authors' HF "
                        "Trainer default), constant = hold --lr")
    p.add_argument("--warmup-steps", type=non_negative_int, default=10)
    p.add_argument("--steps", type=positive_int, default=1000, help="optimizer steps")
    p.add_argument("--global-batch", type=positive_int, default=64, help="samples per optimizer step (all ranks)")
    p.add_argument("--micro-batch", type=positive_int, default=1, help="samples per forward pass and rank")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    p.add_argument("--max-grad-norm", type=positive_float, default=1.0)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="compute dtype: auto = bf16 autocast on GPU, fp32 on CPU (weights stay fp32)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard with FSDP2 instead of DDP")
    p.add_argument("--lora-rank", type=non_negative_int, default=0,
                   help="train PEFT LoRA adapters of this rank on every linear layer but the LM head, base weights "
                        "frozen (0: train every weight)")
    p.add_argument("--lora-alpha", type=positive_float, default=None, help="LoRA alpha (default: 2 x rank)")
    p.add_argument("--lora-output", choices=LORA_OUTPUTS, default="merged",
                   help="merged: a plain transformers model, the adapters folded into its weights; adapter: the PEFT "
                        "adapter and the extended config.json (load the base model with that config, then the "
                        "adapter)")
    p.add_argument("--checkpoint-every", type=non_negative_int, default=100, help="steps between checkpoints (0: none)")
    p.add_argument("--keep-checkpoints", type=positive_int, default=2)
    p.add_argument("--resume", default="auto",
                   help="'auto' (latest checkpoint in OUTPUT/checkpoints if any), 'never', or a checkpoint folder")
    p.add_argument("--split", choices=("train", "all"), default="train",
                   help="train (default): skip the held-out 1-in-10 documents ctxext-eval scores by default; all: "
                        "every document")
    p.add_argument("--max-documents", type=positive_int, default=None, help="use at most this many documents")
    p.add_argument("--min-document-tokens", type=positive_int, default=None,
                   help="skip documents shorter than this (default: what one sample of --method needs, Lt for full "
                        "and --content same, Lc otherwise); to train two methods on the same documents, e.g. PoSE "
                        "against the full-length baseline at the same Lt, pass the larger need (Lt) to both")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--no-kernels", action="store_true", help="keep stock transformers RoPE")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="on an error, show the traceback")
    return p


def validate_settings(args, world_size: int) -> None:
    """The checks that need more than one argument or a look at the file system, before anything slow runs (each
    argument's own range is checked by its argparse type)."""
    per_step = args.micro_batch * world_size
    if args.global_batch % per_step:
        raise ValueError(f"--global-batch {args.global_batch} is not a multiple of --micro-batch x ranks = "
                         f"{args.micro_batch} x {world_size}")
    if args.original_window >= args.target_length:
        raise ValueError(f"--original-window {args.original_window} must be smaller than --target-length "
                         f"{args.target_length}: PoSE extends a window")
    if args.num_chunks > args.original_window:
        raise ValueError(f"--num-chunks {args.num_chunks} is more than --original-window {args.original_window} "
                         "tokens (every chunk holds one token at least)")
    if args.chunk_lengths == "authors" and args.method in ("pose", "contiguous") and args.num_chunks != 2:
        raise ValueError(f"--chunk-lengths authors is the authors' two-chunk rule; it needs --num-chunks 2, got "
                         f"{args.num_chunks}")
    need = PoseSampler(args.original_window, args.target_length, args.num_chunks, args.content, method=args.method,
                       chunk_lengths=args.chunk_lengths).min_document_length
    if args.min_document_tokens is not None and args.min_document_tokens < need:
        raise ValueError(f"--min-document-tokens {args.min_document_tokens} is less than the {need} tokens one "
                         f"--method {args.method} sample needs (Lc={args.original_window}, Lt={args.target_length})")
    if args.rope_type == "dynamic":
        raise ValueError("--rope-type dynamic cannot train a window: the saved config says max_position_embeddings = "
                         "--target-length, and dynamic NTK only rescales positions beyond that, so every training "
                         "position would see the original RoPE; use --rope-type ntk (static NTK, the paper's: "
                         "rope_theta x factor^(d/(d-2)))")
    check_output_folder(args.output)
    split_model_path(args.model)
    data = args.data or python_docs_path()
    if not Path(data).exists():
        raise FileNotFoundError(f"--data {data} does not exist")
    if args.resume not in ("auto", "never") and not Path(args.resume).is_dir():
        raise FileNotFoundError(f"--resume {args.resume} is not a checkpoint folder (or 'auto' / 'never')")


# ---------------------------------------------------------------------------------------------------------- runtime
class Runtime:
    """Rank, world size and device; initialises torch.distributed under torchrun."""

    def __init__(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.distributed and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated (MiB), or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def wrap_model(model, runtime: Runtime, fsdp: bool):
    """DDP or FSDP2 around the model under torchrun; the model itself otherwise."""
    if not runtime.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:  # one FSDP unit per decoder layer: only one layer is gathered at a time
            fully_shard(layer)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[runtime.device] if runtime.device.type == "cuda" else None)


# ------------------------------------------------------------------------------------------------------------- LoRA
def check_lora_args(args) -> None:
    """Refuse LoRA settings that cannot work, before a model is loaded or anything written."""
    if not args.lora_rank:
        if args.lora_alpha is not None or args.lora_output != "merged":
            raise ValueError("--lora-alpha and --lora-output adapter need --lora-rank")
        return
    if args.fsdp:
        raise ValueError("--lora-rank with --fsdp is not supported: merging or saving adapters of a sharded model is "
                         "not implemented; LoRA trains under DDP (drop --fsdp)")
    if args.lora_output == "adapter" and Path(args.model).suffix == ".gguf":
        raise ValueError("--lora-output adapter needs a transformers model folder as --model (the adapter is loaded "
                         "onto it); a .gguf model is dequantized for training: use --lora-output merged")


def add_lora(model, args):
    """The model wrapped in PEFT LoRA adapters (`--lora-rank`, no dropout) on every linear layer but the LM head, its
    own weights frozen; the model itself without `--lora-rank`."""
    if not args.lora_rank:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or 2 * args.lora_rank, lora_dropout=0.0,
                        target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def save_model(model, args, folder: Path, state_dict: dict | None = None) -> None:
    """Write the trained model (`state_dict`: its full state when sharded) to `folder` as a transformers folder;
    with LoRA the adapters merged into the weights, or (`--lora-output adapter`) the PEFT adapter with the extended
    config.json: the adapter names its base model, and that base's own config would lose the RoPE scaling."""
    model.config.use_cache = True
    if not args.lora_rank:
        model.save_pretrained(folder, state_dict=state_dict)
    elif args.lora_output == "merged":
        model.merge_and_unload().save_pretrained(folder)
    else:
        model.peft_config["default"].base_model_name_or_path = str(Path(args.model).resolve())
        model.save_pretrained(folder)
        model.get_base_model().config.save_pretrained(folder)


# ------------------------------------------------------------------------------------------------------ checkpoints
def model_optimizer_state(model, optimizer, fsdp: bool) -> tuple[dict, dict]:
    """Full (unsharded, CPU) state dicts of the model and the optimizer."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    module = model.module if hasattr(model, "module") else model
    return module.state_dict(), optimizer.state_dict()


def load_model_optimizer_state(model, optimizer, model_state: dict, optimizer_state: dict, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                       options=StateDictOptions(full_state_dict=True))
        return
    module = model.module if hasattr(model, "module") else model
    module.load_state_dict(model_state)
    optimizer.load_state_dict(optimizer_state)


def model_identity(config) -> dict:
    """The model's config, as JSON reads it back, without what names a file or a run-time switch: a resumed run
    must have the same."""
    return {k: v for k, v in json.loads(config.to_json_string(use_diff=False)).items()
            if not k.startswith("_") and k not in VOLATILE_CONFIG_KEYS}


def find_resume_checkpoint(args, folder: Path, main: bool, report) -> Checkpoint | None:
    """The checkpoint this run continues from (verified), or None for a fresh run."""
    if args.resume == "never":
        if earlier := checkpoint_folders(folder):
            raise ValueError(f"--resume never, but {folder} holds checkpoints of an earlier run ({earlier[-1].name}); "
                             "a fresh run would mix with them: pass another --output or delete that folder")
        return None
    if args.resume == "auto":
        return newest_checkpoint(folder, report, set_aside=main)
    return verify_checkpoint(Path(args.resume))


def check_resume_settings(checkpoint: Checkpoint, args) -> None:
    """Refuse a resume whose settings would change what the remaining steps compute, naming each difference."""
    if checkpoint.step > args.steps:
        raise ValueError(f"checkpoint {checkpoint.path} is at step {checkpoint.step}, past --steps {args.steps}: "
                         f"pass --steps {checkpoint.step} or more, or start a new run with --output elsewhere")
    saved = checkpoint.meta["segments"][-1]["settings"]
    now = settings_record(args)
    # the linear decay reaches 0 at --steps, so every step's learning rate depends on it
    must_match = RESUME_MUST_MATCH + (("steps",) if args.schedule == "linear" else ())
    changed = [f"--{k.replace('_', '-')} {saved.get(k)} in the checkpoint, {now[k]} now" for k in must_match
               if saved.get(k) != now[k]]
    if changed:
        raise ValueError(f"checkpoint {checkpoint.path} was written with other settings: {'; '.join(changed)}. Resume "
                         "with the checkpoint's settings, or start a new run with --output elsewhere")


def check_resume_inputs(checkpoint: Checkpoint, data_sha256: str, documents: int, model_config: dict,
                        bos_token_id: int | None) -> None:
    """Refuse a resume on other training data (token-stream SHA-256, the BOS each sample starts with) or another
    model config."""
    meta = checkpoint.meta
    if meta.get("bos_token_id") != bos_token_id:
        raise ValueError(f"checkpoint {checkpoint.path} was trained with BOS token {meta.get('bos_token_id')} first in "
                         f"every sample, this tokenizer adds {bos_token_id}; resume with the same tokenizer")
    if meta["data_sha256"] != data_sha256:
        raise ValueError(f"checkpoint {checkpoint.path} was trained on other data: token stream SHA-256 "
                         f"{meta['data_sha256'][:16]}... ({meta['data']['num_documents']} documents) in the "
                         f"checkpoint, {data_sha256[:16]}... ({documents} documents) now; resume with the same --data, "
                         "--max-documents and tokenizer")
    differ = sorted(k for k in set(meta["model_config"]) | set(model_config)
                    if meta["model_config"].get(k) != model_config.get(k))
    if differ:
        shown = "; ".join(f"{k} {meta['model_config'].get(k)} in the checkpoint, {model_config.get(k)} now"
                          for k in differ[:4])
        raise ValueError(f"checkpoint {checkpoint.path} was trained from another model config: {shown}")


# ------------------------------------------------------------------------------------------------------ final model
def save_final_model(model, tokenizer, args, model_state: dict | None, record: dict) -> None:
    """Write the model, tokenizer and `pose_training.json` into OUTPUT: all into a temporary folder first (flushed
    to disk), then each file renamed into place, the record last, so OUTPUT never holds a partly written file and
    holds pose_training.json only when every other file of the model is complete."""
    output = args.output
    temporary = output / f"{TEMPORARY_PREFIX}model-{os.getpid()}"
    try:
        with disk_space_errors(output):
            shutil.rmtree(temporary, ignore_errors=True)
            save_model(model, args, temporary, model_state)
            tokenizer.save_pretrained(temporary)
            (temporary / RECORD_FILE).write_text(json.dumps(record, indent=1))
            for path in (p for p in temporary.rglob("*") if p.is_file()):
                with path.open("rb") as handle:
                    os.fsync(handle.fileno())
            (output / RECORD_FILE).unlink(missing_ok=True)
            for path in sorted(temporary.iterdir(), key=lambda p: p.name == RECORD_FILE):
                target = output / path.name
                if target.is_dir() and path.is_dir():
                    shutil.rmtree(target)
                os.replace(path, target)
            fsync_folder(output)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------------ train
def open_metrics(path: Path, resumed_step: int):
    """The metrics file, opened for appending after dropping the records of steps a resumed run repeats (all of
    them for a fresh run) and a last line cut short by a kill."""
    kept = []
    if path.exists() and resumed_step:
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record["step"] <= resumed_step:
                kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return path.open("a")


def lr_multiplier(schedule: str, warmup_steps: int, total_steps: int):
    """The `LambdaLR` multiplier of --lr for 0-based optimizer step k.

    linear: k / warmup during the warm-up (step 0 trains at lr 0, as in transformers' `get_linear_schedule_with_warmup`
    that the authors' HF Trainer runs), then (total - k) / (total - warmup), reaching 0 at the end.
    constant: (k + 1) / warmup during the warm-up, then 1."""
    if schedule == "constant":
        return lambda k: min(1.0, (k + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return lambda k: k / max(1, warmup_steps) if k < warmup_steps else \
        max(0.0, (total_steps - k) / max(1, total_steps - warmup_steps))


def load_documents(args, tokenizer, min_tokens: int, progress: bool) -> list[torch.Tensor]:
    data = args.data or python_docs_path()
    texts = read_texts(data)
    if args.split == "train":  # the held-out tenth is ctxext-eval's default evaluation text
        texts = (text for text in texts if not is_heldout(text))
    documents, skipped = tokenize_documents(texts, tokenizer, min_tokens, args.max_documents, progress)
    if progress:
        print(f"[{PROG}] {len(documents)} documents from {data} ({skipped} shorter than {min_tokens} tokens "
              "skipped)", file=sys.stderr)
    return documents


def train(args, model=None, tokenizer=None) -> Path:
    """Run the fine-tune described by parsed `args` (from `build_parser()`); return the saved model folder.

    `model` and `tokenizer` may be passed already loaded (with the extended RoPE set, as `load_model` does), e.g. by
    the demo, which evaluates the same model before and after; they are then trained in place."""
    check_lora_args(args)
    runtime = Runtime()
    validate_settings(args, runtime.world_size)
    sampler = PoseSampler(args.original_window, args.target_length, args.num_chunks, args.content, args.seed,
                          args.method, chunk_lengths=args.chunk_lengths)
    with output_lock(args.output, PROG) if runtime.main else contextlib.nullcontext():
        return _train(args, runtime, sampler, model, tokenizer)


def _train(args, runtime: Runtime, sampler: PoseSampler, model, tokenizer) -> Path:
    progress = runtime.main and not args.quiet
    per_step = args.micro_batch * runtime.world_size
    accumulation = args.global_batch // per_step
    checkpoints = args.output / "checkpoints"
    resume = find_resume_checkpoint(args, checkpoints, runtime.main,
                                    lambda message: warn(PROG, message) if runtime.main else None)
    if resume is not None:
        check_resume_settings(resume, args)
    runtime.barrier()  # rank 0 has set corrupt checkpoints aside
    torch.manual_seed(args.seed)

    rope_scaling = describe_rope_scaling(args.model, args.rope_type, args.target_length, args.rope_factor,
                                         args.trained_window)
    if model is None:
        model, tokenizer = load_model(args.model, rope_type=args.rope_type, target_length=args.target_length,
                                      rope_factor=args.rope_factor, trained_window=args.trained_window,
                                      device=runtime.device)
    model.to(runtime.device)
    kernels = select_rope(model, kernels=not args.no_kernels)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model_config = model_identity(model.config)
    model = add_lora(model, args)
    # every sample starts with the BOS the tokenizer adds, at position 0, as the authors' samples do
    sampler.bos_token_id = leading_bos(tokenizer)
    documents = load_documents(args, tokenizer, args.min_document_tokens or sampler.min_document_length, progress)
    data_sha256 = fingerprint(documents)
    if resume is not None:
        check_resume_inputs(resume, data_sha256, len(documents), model_config, sampler.bos_token_id)
    stream = DocumentStream(documents, args.seed)
    collator = PoseCollator(sampler)

    wrapped = wrap_model(model, runtime, args.fsdp)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(args.schedule, args.warmup_steps,
                                                                           args.steps))
    use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and runtime.device.type == "cuda")
    autocast = (lambda: torch.autocast(runtime.device.type, dtype=torch.bfloat16)) if use_bf16 else \
        contextlib.nullcontext

    step = 0
    segments = []  # the stretches of this run, each with the settings it ran under
    if resume is not None:
        state = resume.tensors()
        try:
            load_model_optimizer_state(wrapped, optimizer, state["model"], state["optimizer"], args.fsdp)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {resume.path} does not fit this model: {exc}") from exc
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        sampler.load_state_dict(resume.meta["sampler"])
        stream.load_state_dict(resume.meta["data"])
        step = resume.step
        segments = [s for s in resume.meta["segments"] if s["from_step"] < step]
        if progress:
            print(f"[{PROG}] resumed from {resume.path} at step {step}", file=sys.stderr)
    segments.append({"from_step": step, "settings": settings_record(args), "device": str(runtime.device),
                     "world_size": runtime.world_size, "compute_dtype": "bf16" if use_bf16 else "fp32",
                     "rope": kernels})
    if progress:
        rope = getattr(model.config, "rope_parameters", None) or model.config.rope_scaling
        print(f"[{PROG}] {args.method}: Lc={args.original_window} Lt={args.target_length} rope {rope}, "
              f"{accumulation} x {per_step} samples/step, {'bf16' if use_bf16 else 'fp32'} on {runtime.device}, "
              f"{kernels}", file=sys.stderr)

    last_good = resume.path if resume is not None else None
    metrics_file = open_metrics(args.output / "metrics.jsonl", step) if runtime.main else None
    bar = tqdm(total=args.steps, initial=step, desc=f"{args.method} Lt={args.target_length}", disable=not progress)
    wrapped.train()
    while step < args.steps:
        started = time.perf_counter()
        if runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(runtime.device)
        total_loss = torch.zeros((), device=runtime.device)
        tokens = 0
        for micro in range(accumulation):
            # every rank samples the whole global micro-batch and keeps its rows: sampler and stream stay identical on
            # all ranks (rank 0's checkpoint resumes every rank), and N ranks train on what one process would
            rows = slice(runtime.rank * args.micro_batch, (runtime.rank + 1) * args.micro_batch)
            batch = {k: v[rows].to(runtime.device) for k, v in collator(stream.take(per_step)).items()}
            sync = micro == accumulation - 1 or not hasattr(wrapped, "no_sync")
            with (contextlib.nullcontext() if sync else wrapped.no_sync()), autocast():
                loss = wrapped(**batch).loss / accumulation
            loss.backward()
            total_loss += loss.detach()
            tokens += batch["input_ids"].numel() * runtime.world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), args.max_grad_norm)
        if runtime.distributed:
            torch.distributed.all_reduce(total_loss, op=torch.distributed.ReduceOp.AVG)
        loss_value, grad_value = total_loss.item(), float(grad_norm)
        if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
            kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
            raise RuntimeError(f"step {step + 1}: the loss is {loss_value} and the gradient norm {grad_value}; "
                               f"stopped before the optimizer step, {kept} (lower --lr or check the data)")
        lr = scheduler.get_last_lr()[0]  # the rate this step trains with
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seconds = time.perf_counter() - started
        record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_value,
                  "tokens_per_s": tokens / seconds, "step_s": seconds, "peak_mem_mib": peak_memory_mib(runtime.device)}
        if metrics_file:
            with disk_space_errors(args.output):
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                        mem=f"{record['peak_mem_mib']:.0f}MiB")
        bar.update()
        if args.checkpoint_every and step % args.checkpoint_every == 0 and step < args.steps:
            model_state, optimizer_state = model_optimizer_state(wrapped, optimizer, args.fsdp)
            if runtime.main:
                last_good = save_checkpoint(
                    checkpoints, step,
                    {"model": model_state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                     "torch_rng": torch.get_rng_state()},
                    {"sampler": sampler.state_dict(), "data": stream.state_dict(), "data_sha256": data_sha256,
                     "bos_token_id": sampler.bos_token_id, "model_config": model_config, "segments": segments},
                    args.keep_checkpoints)
            runtime.barrier()
    bar.close()
    if metrics_file:
        metrics_file.close()

    model_state, _ = model_optimizer_state(wrapped, optimizer, args.fsdp) if args.fsdp else (None, None)
    if runtime.main:
        save_final_model(model, tokenizer, args, model_state,
                         {"settings": settings_record(args), "rope_scaling": rope_scaling, "segments": segments,
                          "steps": step, "data": {"sha256": data_sha256, "documents": len(documents),
                                                  "bos_token_id": sampler.bos_token_id}})
    runtime.barrier()
    return args.output


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        output = run_cli(PROG, lambda: train(args), args.debug)
    except KeyboardInterrupt:
        last = (checkpoint_folders(args.output / "checkpoints") or [None])[-1]
        sys.exit(f"[{PROG}] interrupted; {f'the last checkpoint is {last}' if last else 'no checkpoint yet'}: "
                 "run the same command again to resume from it")
    if int(os.environ.get("RANK", "0")) == 0 and not args.quiet:
        print(f"[{PROG}] model saved to {output}", file=sys.stderr)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
