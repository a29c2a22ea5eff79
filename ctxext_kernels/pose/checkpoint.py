"""Training checkpoints that are whole or absent, verified before use, and read without running code.

A checkpoint is a folder `step-<N>` holding
    state.pt     tensors and plain containers only (model, optimizer, scheduler, torch RNG), read back with
                 `torch.load(weights_only=True)`: a tampered file cannot run code while it loads;
    meta.json    everything else (step, settings, sampler and data-stream state, data fingerprint);
    SHA256SUMS   the SHA-256 of both (`sha256sum -c` reads it), checked before either is used.
It is written into `.tmp-step-<N>-<pid>`, flushed to disk, and renamed into place only when complete; a failed or
interrupted save removes (or leaves for the next run to remove) the temporary folder, never a complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from .cli import TEMPORARY_PREFIX, disk_space_errors, fsync_folder, write_bytes_durably

STATE_FILE = "state.pt"
META_FILE = "meta.json"
SUMS_FILE = "SHA256SUMS"
NAME = re.compile(r"step-(\d+)")
CORRUPT_SUFFIX = ".corrupt"


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt or does not fit this run."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint whose checksums were verified; `meta` is its meta.json."""

    path: Path
    meta: dict

    @property
    def step(self) -> int:
        return self.meta["step"]

    def tensors(self) -> dict:
        """The contents of state.pt (on the CPU)."""
        try:
            return torch.load(self.path / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling / zip error means the same thing here
            raise CheckpointError(f"checkpoint {self.path} cannot be read ({type(exc).__name__}: {exc})") from exc


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_folders(folder: Path) -> list[Path]:
    """The checkpoint folders `step-<N>` in `folder`, oldest first (temporary and corrupt ones excluded)."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and NAME.fullmatch(p.name)),
                  key=lambda p: int(NAME.fullmatch(p.name)[1]))


def save_checkpoint(folder: Path, step: int, tensors: dict, meta: dict, keep: int) -> Path:
    """Write checkpoint `folder/step-<step>` atomically and keep only the newest `keep` checkpoints.

    Parameters
    ----------
    tensors : dict
        What `torch.load(weights_only=True)` can read back: tensors, numbers, strings, lists, tuples, dicts.
    meta : dict
        JSON-serialisable; saved with `"step": step` added.
    """
    final = folder / f"step-{step:07d}"
    temporary = folder / f"{TEMPORARY_PREFIX}{final.name}-{os.getpid()}"
    try:
        with disk_space_errors(folder):
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
            # through a Python file object: a full disk then raises OSError(ENOSPC), not torch's bare RuntimeError
            with (temporary / STATE_FILE).open("wb") as handle:
                torch.save(tensors, handle)
                handle.flush()
                os.fsync(handle.fileno())
            write_bytes_durably(temporary / META_FILE, json.dumps({**meta, "step": step}, indent=1).encode())
            sums = "".join(f"{sha256_file(temporary / name)}  {name}\n" for name in (STATE_FILE, META_FILE))
            write_bytes_durably(temporary / SUMS_FILE, sums.encode())
            if final.exists():
                shutil.rmtree(final)
            os.replace(temporary, final)
            fsync_folder(folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    for old in checkpoint_folders(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: Path) -> Checkpoint:
    """Check a checkpoint folder against its SHA256SUMS and read its meta.json; `CheckpointError` naming what is
    wrong otherwise."""
    sums = path / SUMS_FILE
    if not sums.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {SUMS_FILE}; or it was written by an older "
                              "version of ctxext-train)")
    try:
        expected = dict(reversed(line.split(maxsplit=1)) for line in sums.read_text().splitlines())
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: {SUMS_FILE} cannot be read") from exc
    if set(expected) != {STATE_FILE, META_FILE}:
        raise CheckpointError(f"checkpoint {path} is corrupt: {SUMS_FILE} lists {sorted(expected)}")
    for name, digest in expected.items():
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if sha256_file(path / name) != digest:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its SHA-256 in {SUMS_FILE}")
    meta = json.loads((path / META_FILE).read_text())
    if NAME.fullmatch(path.name) and meta.get("step") != int(NAME.fullmatch(path.name)[1]):
        raise CheckpointError(f"checkpoint {path} is corrupt: its meta.json says step {meta.get('step')}")
    return Checkpoint(path, meta)


def newest_checkpoint(folder: Path, report: Callable[[str], None], set_aside: bool = True) -> Checkpoint | None:
    """The newest checkpoint in `folder` that verifies, or None when `folder` holds none.

    A newer checkpoint that fails verification is reported and, with `set_aside` (one process of a distributed run),
    renamed `step-<N>.corrupt` so no later save or resume mistakes it for a good one; the run resumes from the one
    before it. When none verifies, `CheckpointError` names them all and nothing is renamed.
    """
    problems = []
    for path in reversed(checkpoint_folders(folder)):
        try:
            checkpoint = verify_checkpoint(path)
        except (CheckpointError, OSError, ValueError) as exc:
            problems.append((path, exc))
            continue
        for bad, exc in problems:
            aside = bad.with_name(bad.name + CORRUPT_SUFFIX)
            if set_aside:
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(bad, aside)
            report(f"{exc}; it is set aside as {aside} and the run resumes from {checkpoint.path}")
        return checkpoint
    if problems:
        raise CheckpointError(f"no checkpoint in {folder} can be used: " + "; ".join(str(e) for _, e in problems) +
                              f" (delete {folder} to start over)")
    return None
