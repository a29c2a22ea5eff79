"""ctxext-train --fsdp: FSDP2 (`fully_shard`, one unit per decoder layer) under torchrun, two gloo ranks on CPU, trains
exactly what one process trains and saves a stock-loadable model."""

import json
import subprocess
import sys

import torch

from ctxext_kernels.pose import train as pose_train
from pose_fixtures import TINY_WINDOW, save_tiny_llama, write_corpus

LT = 4 * TINY_WINDOW


def settings(model, data, output, micro_batch):
    return ["--model", str(model), "--data", str(data), "--output", str(output), "--original-window",
            str(TINY_WINDOW // 2), "--target-length", str(LT), "--steps", "4", "--global-batch", "4", "--micro-batch",
            str(micro_batch), "--warmup-steps", "2", "--lr", "1e-3", "--quiet", "--no-kernels", "--trained-window",
            str(TINY_WINDOW), "--checkpoint-every", "0"]


def test_fsdp_under_torchrun_matches_one_process(tmp_path):
    """Same parameters up to float reduction order (FSDP reduce-scatters gradients where one process sums them)."""
    from transformers import AutoModelForCausalLM

    model, data = save_tiny_llama(tmp_path / "model"), write_corpus(tmp_path / "corpus")
    pose_train.main(settings(model, data, tmp_path / "single", 2))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ctxext_kernels.pose.train",
               *settings(model, data, tmp_path / "fsdp", 1), "--fsdp"]
    subprocess.run(command, check=True, capture_output=True, timeout=240)
    assert json.loads((tmp_path / "fsdp" / "pose_training.json").read_text())["settings"]["fsdp"] is True
    single = AutoModelForCausalLM.from_pretrained(tmp_path / "single").state_dict()
    fsdp = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp").state_dict()
    original = AutoModelForCausalLM.from_pretrained(model).state_dict()
    assert fsdp.keys() == single.keys()
    for name, value in single.items():
        torch.testing.assert_close(fsdp[name], value, rtol=0, atol=1e-6)
    assert any(not torch.equal(value, original[name]) for name, value in fsdp.items())
    losses = [json.loads(line)["loss"] for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line)["loss"] for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=0)
