"""What `ctxext-train` and `ctxext-eval` share as command-line tools: argument types that refuse nonsense, one-line
errors, an output folder that one run owns at a time, and writes that are whole or absent and say "no space left".
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

from ..ops.spec import MAX_POSITION

TEMPORARY_PREFIX = ".tmp-"  # a write in progress; whatever carries it when no run holds the lock is a leftover
LOCK_FILE = ".lock"
EXTRA_HINT = "pip install ctxext_kernels[pose]"


# ------------------------------------------------------------------------------------------------- argument types
def _number(text: str, kind: type, low: float, low_included: bool, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value) or value < low or (value == low and not low_included):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, 1, True, "a positive integer")


def non_negative_int(text: str) -> int:
    return _number(text, int, 0, True, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(text, float, 0.0, False, "a finite number > 0")


def non_negative_float(text: str) -> float:
    return _number(text, float, 0.0, True, "a finite number >= 0")


def rope_factor(text: str) -> float:
    return _number(text, float, 1.0, True, "a finite RoPE scale factor >= 1")


def context_length(text: str) -> int:
    """A token count a RoPE model can be asked for: 1 ... 2^24 (the kernels' exact-fp32 position range)."""
    value = positive_int(text)
    if value > MAX_POSITION + 1:
        raise argparse.ArgumentTypeError(f"{text} is above 2^24 = {MAX_POSITION + 1}, the longest context whose "
                                         "position ids fp32 holds exactly")
    return value


def length_list(text: str) -> list[int]:
    """Comma-separated context lengths, each >= 2 (one predicted token at least)."""
    lengths = [context_length(part) for part in text.split(",")]
    if min(lengths) < 2:
        raise argparse.ArgumentTypeError(f"every length must be >= 2 tokens, got {min(lengths)}")
    return lengths


def fraction_list(text: str) -> tuple[float, ...]:
    """Comma-separated numbers in [0, 1]."""
    values = tuple(_number(part, float, 0.0, True, "a number in [0, 1]") for part in text.split(","))
    if max(values) > 1:
        raise argparse.ArgumentTypeError(f"{max(values)} is not in [0, 1]")
    return values


# ------------------------------------------------------------------------------------------------ errors
EXPECTED_ERRORS = (ValueError, RuntimeError, OSError, ImportError)  # raised with a message meant for the user


def one_line(exc: BaseException) -> str:
    """The message of an error on one line; an unexpected error type is named in front of it."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    return message if isinstance(exc, EXPECTED_ERRORS) else f"{type(exc).__name__}: {message}"


def run_cli(prog: str, body: Callable[[], object], debug: bool):
    """Run a CLI's work; every error ends the process with one line `<prog>: error: ...` and exit status 1 (with
    `debug`, the exception itself and its traceback)."""
    try:
        return body()
    except Exception as exc:  # noqa: BLE001 - a tool's user gets one clear line; --debug gives the traceback
        if debug:
            raise
        hint = "" if isinstance(exc, EXPECTED_ERRORS) else " (--debug shows the traceback)"
        sys.exit(f"{prog}: error: {one_line(exc)}{hint}")


def settings_record(args: argparse.Namespace) -> dict:
    """A CLI's parsed arguments as JSON can hold them (paths as strings; `--debug` left out: it changes no result)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "debug"}


def check_output_folder(path: Path) -> None:
    """`--output` must be a folder or not exist yet: checked before anything slow runs."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output {path} is a file, not a folder: pass a folder (it is created if missing)")


# ------------------------------------------------------------------------------------------------ output folder
@contextlib.contextmanager
def output_lock(folder: Path, prog: str) -> Iterator[None]:
    """Own `folder` for one run: create it, hold an exclusive `flock` on `folder/.lock` (released by the kernel when
    the process ends, however it ends) and remove what earlier runs left half-written (`remove_temporaries`). A second
    run on the same folder is refused."""
    check_output_folder(folder)
    with disk_space_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
        handle = (folder / LOCK_FILE).open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise RuntimeError(f"--output {folder} is in use by another run ({owner} holds {folder / LOCK_FILE}): "
                               "wait for it to finish or pass another --output") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{prog} pid {os.getpid()}\n")
        handle.flush()
        if leftovers := remove_temporaries(folder):
            warn(prog, f"removed what an interrupted run left half-written: {', '.join(map(str, leftovers))}")
        yield
    finally:
        handle.close()


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the `.tmp-*` entries in `folder` and its direct subfolders (half-written checkpoints or models of a run
    that was killed or failed); return what was removed."""
    leftovers = sorted([*folder.glob(f"{TEMPORARY_PREFIX}*"), *folder.glob(f"*/{TEMPORARY_PREFIX}*")])
    for path in leftovers:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return leftovers


# ------------------------------------------------------------------------------------------------ writes
class DiskFullError(OSError):
    """A write failed because its file system is full (or over quota); `str()` is the message alone."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a full disk: OSError ENOSPC/EDQUOT, or the same error as reported by
    libraries that rewrap it (safetensors and tokenizers say "No space left on device (os error 28)")."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "os error 28" in str(exc):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def disk_space_errors(path: Path) -> Iterator[None]:
    """Turn a full-disk failure of the writes inside into `DiskFullError("no space left on <path> ...")`."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        try:
            free = f"{shutil.disk_usage(path if path.exists() else path.parent).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        raise DiskFullError(f"no space left on {path} ({free}) while writing: free some space and run the same "
                            "command again") from exc


def fsync_folder(folder: Path) -> None:
    """Make the renames inside `folder` durable (a crash after this keeps them)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_bytes_durably(path: Path, data: bytes) -> None:
    """Write a file and flush it to disk (without renaming: the caller's folder is still temporary)."""
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` by `text` all at once: a reader (or a later run, after a kill) sees the old or the new file,
    never part of one."""
    temporary = path.with_name(f"{TEMPORARY_PREFIX}{path.name}-{os.getpid()}")
    try:
        with disk_space_errors(path.parent):
            write_bytes_durably(temporary, text.encode())
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def warn(prog: str, message: str) -> None:
    print(f"[{prog}] warning: {message}", file=sys.stderr)
