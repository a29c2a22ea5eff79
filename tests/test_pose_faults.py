"""Fault injection for ctxext-train on the tiny random model: after each fault the run either resumes and ends
bit-identical to an uninterrupted run (weights and every step's loss), or stops with a one-line error and the last
good checkpoint intact.

- kill -9 at seeded points: a child process runs ctxext-train with one function wrapped to SIGKILL the process at
  its k-th call (k drawn from a seeded generator): inside the write of a checkpoint's state.pt, just before a
  complete checkpoint is renamed into place, and between the renames of the final model's files. No test hook lives
  in the package: the wrapping is done by the child's own code.
- Ctrl-C (KeyboardInterrupt) inside a checkpoint save, in-process.
- Bytes flipped in the newest checkpoint (resume falls back to the one before), then in every checkpoint (refused).
- A full disk: a real size-capped tmpfs mounted for the test when this process may mount one (root with
  CAP_SYS_ADMIN); otherwise the writers are patched to fail as a full disk makes them fail (OSError ENOSPC from
  Python's file writes, "No space left on device (os error 28)" from the tokenizers library). `disk_filler` says
  which ran.
- A diverging loss (lr 1e20): stopped before the optimizer step with the step-1 checkpoint kept.
"""

import errno
import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from ctxext_kernels.pose import train as pose_train
from ctxext_kernels.pose.checkpoint import checkpoint_folders, verify_checkpoint
from pose_fixtures import assert_same_weights, model_weights, save_tiny_llama, train_argv, write_corpus

STEPS = ("--steps", "6", "--checkpoint-every", "2")  # checkpoints at steps 2 and 4
SEEDS = np.random.default_rng(2024)  # the kill points


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pose_faults")
    model, data = save_tiny_llama(root / "model"), write_corpus(root / "corpus")
    reference = root / "reference"
    pose_train.main(train_argv(model, data, reference, *STEPS))
    return model, data, reference


def argv(workspace, output, *extra):
    model, data, _ = workspace
    return train_argv(model, data, output, *STEPS, *extra)


def losses(output) -> list:
    return [(r["step"], r["loss"]) for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines())]


def leftovers(output) -> list:
    return sorted(p.name for p in [*output.glob(".tmp-*"), *output.glob("*/.tmp-*")])


def assert_finishes_like_the_reference(workspace, output):
    """Run the same command again: it must resume, finish, and match the uninterrupted run bit for bit."""
    reference = workspace[2]
    pose_train.main(argv(workspace, output))
    assert leftovers(output) == []
    assert losses(output) == losses(reference)
    assert_same_weights(model_weights(output), model_weights(reference))
    assert (output / "pose_training.json").exists()


# ----------------------------------------------------------------------------------------------------------- kill -9
CHILD = r"""
import os, signal, sys
import torch
from ctxext_kernels.pose import train

point, k = sys.argv[1], int(sys.argv[2])
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point == "inside-state-write":  # the k-th write of the second checkpoint's state.pt: half of it lands, then -9
    save, saves = torch.save, []

    class Dying:
        def __init__(self, handle):
            self.handle, self.writes = handle, 0

        def write(self, data):
            self.writes += 1
            if self.writes == k:
                self.handle.write(bytes(data)[:len(data) // 2])
                self.handle.flush()
                die()
            return self.handle.write(data)

        def flush(self):
            self.handle.flush()

    def dying_save(obj, handle, *args, **kwargs):
        saves.append(1)
        return save(obj, Dying(handle) if len(saves) == 2 else handle, *args, **kwargs)

    torch.save = dying_save
else:  # os.replace: the rename of the complete step-4 checkpoint, or the k-th file of the final model
    replace, moved = os.replace, []

    def dying_replace(source, target):
        name, parent = os.path.basename(source), os.path.basename(os.path.dirname(source))
        if point == "before-checkpoint-rename" and name.startswith(".tmp-step-0000004"):
            die()
        if point == "between-final-renames" and parent.startswith(".tmp-model-"):
            moved.append(name)
            if len(moved) == k:
                die()
        return replace(source, target)

    os.replace = dying_replace
train.main(sys.argv[3:])
"""


@pytest.mark.parametrize("point, k, last_good", [
    ("inside-state-write", int(SEEDS.integers(1, 200)), 2),
    ("before-checkpoint-rename", 1, 2),
    ("between-final-renames", int(SEEDS.integers(1, 6)), 4),
])
def test_kill_9(workspace, tmp_path, point, k, last_good):
    output = tmp_path / "out"
    child = subprocess.run([sys.executable, "-c", CHILD, point, str(k), *argv(workspace, output)],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert checkpoint_folders(output / "checkpoints")[-1].name == f"step-{last_good:07d}"
    verify_checkpoint(output / "checkpoints" / f"step-{last_good:07d}")
    assert not (output / "pose_training.json").exists()  # written last: absent unless the model is complete
    assert leftovers(output)  # the killed save's temporary folder, removed by the next run
    assert_finishes_like_the_reference(workspace, output)


def test_ctrl_c_inside_a_save_keeps_the_last_checkpoint(workspace, tmp_path, monkeypatch):
    output = tmp_path / "out"
    save, saves = torch.save, []

    def interrupted_save(obj, handle, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            handle.write(b"half a checkpoint")
            raise KeyboardInterrupt
        return save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(SystemExit, match="interrupted; the last checkpoint is .*step-0000002"):
        pose_train.main(argv(workspace, output))
    monkeypatch.undo()
    assert leftovers(output) == [] and [p.name for p in checkpoint_folders(output / "checkpoints")] == ["step-0000002"]
    assert_finishes_like_the_reference(workspace, output)


# ------------------------------------------------------------------------------------------------------ flipped bytes
def flip(path, count=16):
    data = bytearray(path.read_bytes())
    for position in SEEDS.choice(len(data), size=count, replace=False):
        data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes(workspace, tmp_path, capsys):
    output = tmp_path / "out"
    shutil.copytree(workspace[2], output)
    flip(output / "checkpoints" / "step-0000004" / "state.pt")
    assert_finishes_like_the_reference(workspace, output)  # resumed from step 2, said so
    assert "step-0000004 is corrupt: state.pt does not match its SHA-256" in capsys.readouterr().err
    assert (output / "checkpoints" / "step-0000004.corrupt").is_dir()

    flip(output / "checkpoints" / "step-0000002" / "meta.json", count=2)
    flip(output / "checkpoints" / "step-0000004" / "state.pt")
    final_model = model_weights(output)
    with pytest.raises(SystemExit, match="no checkpoint in .* can be used: .*step-0000004 is corrupt.*step-0000002 "
                                         "is corrupt: meta.json does not match"):
        pose_train.main(argv(workspace, output))
    assert_same_weights(model_weights(output), final_model)  # the finished model is untouched


# ---------------------------------------------------------------------------------------------------------- full disk
def can_mount_tmpfs(folder) -> bool:
    folder.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    subprocess.run(["umount", str(folder)], check=True, timeout=30)
    return True


def folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def disk_filler(workspace, tmp_path, monkeypatch):
    """`fill(output, where)`: make the disk of `output` full when the run reaches `where` ("checkpoint": the
    step-4 checkpoint; "model": the final model), then `free()` makes room again."""
    reference = workspace[2]
    mount = tmp_path / "disk"
    if can_mount_tmpfs(mount):
        checkpoint = folder_bytes(reference / "checkpoints" / "step-0000002")
        model = folder_bytes(reference) - 2 * checkpoint

        class Tmpfs:
            kind = "tmpfs"
            output = mount / "out"

            def fill(self, where):
                # room for one checkpoint and half a second one, or for half the model; 64 KiB slack for pages
                size = checkpoint + checkpoint // 2 if where == "checkpoint" else model // 2
                subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size + 64 * 1024}", "tmpfs", str(mount)],
                               check=True, timeout=30)

            def free(self):
                subprocess.run(["mount", "-o", "remount,size=16m", str(mount)], check=True, timeout=30)

        filler = Tmpfs()
        yield filler
        subprocess.run(["umount", str(mount)], check=False, timeout=30)
        return

    class Patched:
        kind = "patched writers"
        output = tmp_path / "out"

        def fill(self, where):
            if where == "checkpoint":
                save, saves = torch.save, []

                def full_save(obj, handle, *args, **kwargs):
                    saves.append(1)
                    if len(saves) == 2:
                        handle.write(b"part of a checkpoint")
                        raise OSError(errno.ENOSPC, "No space left on device")
                    return save(obj, handle, *args, **kwargs)

                monkeypatch.setattr(torch, "save", full_save)
            else:
                from transformers import PreTrainedTokenizerBase

                def full_tokenizer_save(self, folder, *args, **kwargs):
                    (folder / "tokenizer.json").write_text('{"trunc')
                    raise Exception("No space left on device (os error 28)")  # what the tokenizers library raises

                monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full_tokenizer_save)

        def free(self):
            monkeypatch.undo()

    yield Patched()


@pytest.mark.parametrize("where", ["checkpoint", "model"])
def test_full_disk(workspace, disk_filler, where, capsys):
    output = disk_filler.output
    disk_filler.fill(where)
    extra = ("--checkpoint-every", "0", "--steps", "6") if where == "model" else ()
    folder = output / "checkpoints" if where == "checkpoint" else output
    with pytest.raises(SystemExit, match=f"error: no space left on {folder} "):
        pose_train.main(argv(workspace, output, *extra))
    assert leftovers(output) == [], disk_filler.kind
    assert not (output / "pose_training.json").exists()
    if where == "checkpoint":
        assert [p.name for p in checkpoint_folders(output / "checkpoints")] == ["step-0000002"]
        verify_checkpoint(output / "checkpoints" / "step-0000002")
    else:
        assert not (output / "tokenizer.json").exists() and not (output / "model.safetensors").exists()
    disk_filler.free()
    if where == "checkpoint":
        assert_finishes_like_the_reference(workspace, output)
    else:
        pose_train.main(argv(workspace, output, *extra))
        assert_same_weights(model_weights(output), model_weights(workspace[2]))
    print(f"full disk made by: {disk_filler.kind}")


# ------------------------------------------------------------------------------------------------ non-finite loss
def test_diverging_loss_stops_with_the_last_good_checkpoint(workspace, tmp_path):
    output = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"step 2: the loss is nan and the gradient norm nan; stopped before the "
                                         r"optimizer step, the last good checkpoint is .*step-0000001"):
        # constant: the linear schedule's first step trains at lr 0
        pose_train.main(argv(workspace, output, "--lr", "1e20", "--checkpoint-every", "1", "--schedule", "constant"))
    verify_checkpoint(output / "checkpoints" / "step-0000001")
    assert [r["step"] for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines())] == [1]
    assert not (output / "model.safetensors").exists() and leftovers(output) == []
