"""`ctxext-train`: PoSE (or full-length / RandPos) fine-tuning of a RoPE causal LM to a longer context.

A thin loop on plain PyTorch + transformers: AdamW, linear warm-up then constant learning rate (the paper's recipe:
lr 2e-5, 10 warm-up steps, global batch 64, 1000 steps), gradient accumulation, bf16 autocast on GPU, optional gradient
checkpointing, DDP or FSDP2 (`fully_shard`) under torchrun. Checkpoints hold everything a resumed run needs to continue
bit-for-bit (model, optimizer, scheduler, sampler RNG, data position, torch RNG) and are written to a temporary folder
that is renamed into place only when complete. The result is a transformers model folder with the new RoPE scaling.

Example::

    ctxext-train --model SmolLM2.gguf --data docs/ --output out --original-window 2048 --target-length 16384
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import DocumentStream, python_docs_path, read_texts, tokenize_documents
from .modeling import ROPE_TYPES, load_model, select_rope
from .sampler import CONTENT_STRATEGIES, METHODS, PoseCollator, PoseSampler

CHECKPOINT_FILE = "state.pt"
# settings that change which samples a step sees: a resumed run must keep them to continue the same run
RESUME_MUST_MATCH = ("method", "original_window", "target_length", "num_chunks", "content", "rope_type",
                     "rope_factor", "global_batch", "micro_batch", "seed", "max_documents")
CHECKPOINT_PREFIX = "step-"
LORA_OUTPUTS = ("merged", "adapter")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctxext-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="transformers model folder or .gguf file")
    p.add_argument("--data", default=None,
                   help="training text: .txt/.jsonl/.parquet file, a folder of text files or a datasets folder "
                        "(default: the Python 3.11 docs, package python3.11-doc)")
    p.add_argument("--output", required=True, type=Path, help="output model folder (checkpoints/ and metrics.jsonl "
                                                               "go inside)")
    p.add_argument("--method", choices=METHODS, default="pose")
    p.add_argument("--original-window", type=int, required=True, help="Lc: training sequence length")
    p.add_argument("--target-length", type=int, required=True, help="Lt: context length to extend to")
    p.add_argument("--num-chunks", type=int, default=2)
    p.add_argument("--content", choices=CONTENT_STRATEGIES, default="random")
    p.add_argument("--rope-type", choices=ROPE_TYPES, default="linear")
    p.add_argument("--rope-factor", type=float, default=None,
                   help="RoPE scale factor (default: target length / the model's trained window)")
    p.add_argument("--trained-window", type=int, default=None,
                   help="the context the model was trained on (default: its max_position_embeddings)")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--global-batch", type=int, default=64, help="samples per optimizer step (all ranks)")
    p.add_argument("--micro-batch", type=int, default=1, help="samples per forward pass and rank")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="compute dtype: auto = bf16 autocast on GPU, fp32 on CPU (weights stay fp32)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard with FSDP2 instead of DDP")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="train PEFT LoRA adapters of this rank on every linear layer but the LM head, base weights "
                        "frozen (0: train every weight)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    p.add_argument("--lora-output", choices=LORA_OUTPUTS, default="merged",
                   help="merged: a plain transformers model, the adapters folded into its weights; adapter: the PEFT "
                        "adapter and the extended config.json (load the base model with that config, then the "
                        "adapter)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (0: none)")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--resume", default="auto",
                   help="'auto' (latest checkpoint in OUTPUT/checkpoints if any), 'never', or a checkpoint folder")
    p.add_argument("--max-documents", type=int, default=None, help="use at most this many documents")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-kernels", action="store_true", help="keep stock transformers RoPE")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


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
    if args.lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0 (0: train every weight), got {args.lora_rank}")
    if not args.lora_rank:
        if args.lora_alpha is not None or args.lora_output != "merged":
            raise ValueError("--lora-alpha and --lora-output adapter need --lora-rank")
        return
    if args.lora_alpha is not None and args.lora_alpha <= 0:
        raise ValueError(f"--lora-alpha must be > 0, got {args.lora_alpha}")
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


def save_model(model, args, state_dict: dict | None = None) -> None:
    """Write the trained model (`state_dict`: its full state when sharded) to `args.output` as a transformers folder;
    with LoRA the adapters merged into the weights, or (`--lora-output adapter`) the PEFT adapter with the extended
    config.json: the adapter names its base model, and that base's own config would lose the RoPE scaling."""
    model.config.use_cache = True
    if not args.lora_rank:
        model.save_pretrained(args.output, state_dict=state_dict)
    elif args.lora_output == "merged":
        model.merge_and_unload().save_pretrained(args.output)
    else:
        model.peft_config["default"].base_model_name_or_path = str(Path(args.model).resolve())
        model.save_pretrained(args.output)
        model.get_base_model().config.save_pretrained(args.output)


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


def save_checkpoint(folder: Path, state: dict, keep: int) -> Path:
    """Write `state` to `folder/step-<N>` atomically: into a temporary folder first, renamed when complete."""
    final = folder / f"{CHECKPOINT_PREFIX}{state['step']:07d}"
    temporary = folder / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    torch.save(state, temporary / CHECKPOINT_FILE)
    (temporary / "meta.json").write_text(json.dumps({"step": state["step"], "complete": True}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(temporary, final)
    for old in sorted(folder.glob(f"{CHECKPOINT_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in `folder` (temporary leftovers of an interrupted save are ignored)."""
    candidates = sorted(folder.glob(f"{CHECKPOINT_PREFIX}*")) if folder.is_dir() else []
    return candidates[-1] if candidates else None


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint folder; a clear error when it is incomplete or corrupt."""
    state_file = path / CHECKPOINT_FILE
    if not state_file.is_file() or not (path / "meta.json").is_file():
        raise RuntimeError(f"checkpoint {path} is incomplete (no {CHECKPOINT_FILE} / meta.json): delete it or pass "
                           "--resume with another checkpoint")
    try:
        meta = json.loads((path / "meta.json").read_text())
        state = torch.load(state_file, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling / zip error means the same thing to the user
        raise RuntimeError(f"checkpoint {path} is corrupt and cannot be read ({type(exc).__name__}: {exc}); delete "
                           "it or pass --resume with another checkpoint") from exc
    if not isinstance(state, dict) or state.get("step") != meta.get("step"):
        raise RuntimeError(f"checkpoint {path} is corrupt: its state does not match its meta.json")
    return state


# ------------------------------------------------------------------------------------------------------------ train
def open_metrics(path: Path, resumed_step: int):
    """The metrics file, opened for appending after dropping the records of steps a resumed run repeats (all of
    them for a fresh run)."""
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resumed_step] \
        if path.exists() and resumed_step else []
    path.write_text("".join(line + "\n" for line in kept))
    return path.open("a")


def warmup_then_constant(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def load_documents(args, tokenizer, min_tokens: int, progress: bool) -> list[torch.Tensor]:
    data = args.data or python_docs_path()
    documents, skipped = tokenize_documents(read_texts(data), tokenizer, min_tokens, args.max_documents, progress)
    if progress:
        print(f"[ctxext-train] {len(documents)} documents from {data} ({skipped} shorter than {min_tokens} tokens "
              "skipped)", file=sys.stderr)
    return documents


def train(args, model=None, tokenizer=None) -> Path:
    """Run the fine-tune described by parsed `args` (from `build_parser()`); return the saved model folder.

    `model` and `tokenizer` may be passed already loaded (with the extended RoPE set, as `load_model` does), e.g. by
    the demo, which evaluates the same model before and after; they are then trained in place."""
    check_lora_args(args)
    runtime = Runtime()
    progress = runtime.main and not args.quiet
    per_step = args.micro_batch * runtime.world_size
    if args.global_batch % per_step:
        raise ValueError(f"--global-batch {args.global_batch} is not a multiple of micro-batch x ranks = {per_step}")
    accumulation = args.global_batch // per_step
    torch.manual_seed(args.seed)

    sampler = PoseSampler(args.original_window, args.target_length, args.num_chunks, args.content, args.seed,
                          args.method)
    if model is None:
        model, tokenizer = load_model(args.model, rope_type=args.rope_type, target_length=args.target_length,
                                      rope_factor=args.rope_factor, trained_window=args.trained_window,
                                      device=runtime.device)
    model.to(runtime.device)
    kernels = select_rope(model, kernels=not args.no_kernels)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = add_lora(model, args)
    documents = load_documents(args, tokenizer, sampler.min_document_length, progress)
    stream = DocumentStream(documents, args.seed)
    collator = PoseCollator(sampler)

    wrapped = wrap_model(model, runtime, args.fsdp)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_constant(args.warmup_steps))
    use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and runtime.device.type == "cuda")
    autocast = (lambda: torch.autocast(runtime.device.type, dtype=torch.bfloat16)) if use_bf16 else \
        contextlib.nullcontext

    args.output.mkdir(parents=True, exist_ok=True)
    checkpoints = args.output / "checkpoints"
    step = 0
    resume_from = None if args.resume == "never" else \
        latest_checkpoint(checkpoints) if args.resume == "auto" else Path(args.resume)
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        changed = {k: (state["args"].get(k), getattr(args, k)) for k in RESUME_MUST_MATCH
                   if state["args"].get(k) != getattr(args, k)}
        if changed:
            raise ValueError(f"checkpoint {resume_from} was written with other settings {changed} (saved, now): "
                             "resume with the same settings, or pass --resume never / another --output")
        load_model_optimizer_state(wrapped, optimizer, state["model"], state["optimizer"], args.fsdp)
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        stream.load_state_dict(state["data"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        if progress:
            print(f"[ctxext-train] resumed from {resume_from} at step {step}", file=sys.stderr)
    if progress:
        print(f"[ctxext-train] {args.method}: Lc={args.original_window} Lt={args.target_length} rope "
              f"{model.config.rope_parameters if hasattr(model.config, 'rope_parameters') else model.config.rope_scaling}"
              f", {accumulation} x {per_step} samples/step, {'bf16' if use_bf16 else 'fp32'} on {runtime.device}, "
              f"{kernels}", file=sys.stderr)

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
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if runtime.distributed:
            torch.distributed.all_reduce(total_loss, op=torch.distributed.ReduceOp.AVG)
        seconds = time.perf_counter() - started
        record = {"step": step, "loss": total_loss.item(), "lr": scheduler.get_last_lr()[0],
                  "grad_norm": float(grad_norm), "tokens_per_s": tokens / seconds, "step_s": seconds,
                  "peak_mem_mib": peak_memory_mib(runtime.device)}
        if metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                        mem=f"{record['peak_mem_mib']:.0f}MiB")
        bar.update()
        if args.checkpoint_every and step % args.checkpoint_every == 0 and step < args.steps:
            model_state, optimizer_state = model_optimizer_state(wrapped, optimizer, args.fsdp)
            if runtime.main:
                save_checkpoint(checkpoints, {"step": step, "model": model_state, "optimizer": optimizer_state,
                                              "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(),
                                              "data": stream.state_dict(), "torch_rng": torch.get_rng_state(),
                                              "args": vars(args)}, args.keep_checkpoints)
            runtime.barrier()
    bar.close()
    if metrics_file:
        metrics_file.close()

    model_state, _ = model_optimizer_state(wrapped, optimizer, args.fsdp) if args.fsdp else (None, None)
    if runtime.main:
        save_model(model, args, model_state)
        tokenizer.save_pretrained(args.output)
        (args.output / "pose_training.json").write_text(json.dumps(
            {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, indent=1))
    runtime.barrier()
    return args.output


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        output = train(args)
    except KeyboardInterrupt:
        last = latest_checkpoint(args.output / "checkpoints")
        sys.exit(f"[ctxext-train] interrupted; {f'the last checkpoint is {last}' if last else 'no checkpoint yet'}: "
                 "run the same command again to resume from it")
    if int(os.environ.get("RANK", "0")) == 0 and not args.quiet:
        print(f"[ctxext-train] model saved to {output}", file=sys.stderr)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
