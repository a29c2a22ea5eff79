"""ctxext-train on a tiny random LLaMA: finite loss, bit-exact resume, a stock-loadable extended model, clear errors."""

import json

import pytest
import torch

from ctxext_kernels.pose import train as pose_train
from pose_fixtures import TINY_WINDOW, save_tiny_llama, write_corpus

LT = 4 * TINY_WINDOW


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pose_train")
    return save_tiny_llama(root / "model"), write_corpus(root / "corpus")


def run(model, data, output, *extra):
    pose_train.main(["--model", str(model), "--data", str(data), "--output", str(output), "--original-window",
                     str(TINY_WINDOW // 2), "--target-length", str(LT), "--steps", "4", "--global-batch", "4",
                     "--micro-batch", "2", "--warmup-steps", "2", "--lr", "1e-3", "--quiet", "--no-kernels",
                     "--trained-window", str(TINY_WINDOW), *extra])


def test_train_resume_and_output(workspace, tmp_path):
    model, data = workspace
    run(model, data, tmp_path / "straight", "--checkpoint-every", "0")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))

    # interrupted after step 2 (a checkpoint at step 2, stopped), then resumed to step 4
    run(model, data, tmp_path / "resumed", "--checkpoint-every", "2", "--steps", "3")
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["step-0000002"]
    run(model, data, tmp_path / "resumed", "--checkpoint-every", "2")
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the interrupted run's step 3 was replaced by the resumed run's
    with pytest.raises(ValueError, match="other settings"):
        run(model, data, tmp_path / "resumed", "--seed", "1")

    from transformers import AutoModelForCausalLM

    straight = AutoModelForCausalLM.from_pretrained(tmp_path / "straight")
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    original = AutoModelForCausalLM.from_pretrained(model)
    assert not torch.equal(original.model.layers[0].mlp.up_proj.weight, straight.model.layers[0].mlp.up_proj.weight)

    config = straight.config
    assert config.max_position_embeddings == LT
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == LT / TINY_WINDOW
    saved = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert saved["max_position_embeddings"] == LT and saved["rope_parameters"]["factor"] == LT / TINY_WINDOW
    # the extended model's rotary embedding really interpolates: inv_freq divided by the factor
    base = original.model.rotary_emb.inv_freq
    torch.testing.assert_close(straight.model.rotary_emb.inv_freq, base / (LT / TINY_WINDOW))


def test_yarn_config_keeps_the_original_window(workspace, tmp_path):
    model, data = workspace
    run(model, data, tmp_path / "yarn", "--rope-type", "yarn", "--steps", "1", "--global-batch", "2",
        "--checkpoint-every", "0", "--method", "randpos")
    saved = json.loads((tmp_path / "yarn" / "config.json").read_text())["rope_parameters"]
    assert saved["rope_type"] == "yarn" and saved["original_max_position_embeddings"] == TINY_WINDOW


def test_corrupt_checkpoint_is_named(workspace, tmp_path):
    model, data = workspace
    checkpoint = tmp_path / "out" / "checkpoints" / "step-0000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.pt").write_bytes(b"not a checkpoint")
    (checkpoint / "meta.json").write_text('{"step": 1, "complete": true}')
    with pytest.raises(RuntimeError, match="is corrupt"):
        run(model, data, tmp_path / "out")


def test_model_without_rope_is_named(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from ctxext_kernels.pose.modeling import load_model

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no rotary position embeddings"):
        load_model(tmp_path, rope_type="linear", target_length=4096)


def test_ddp_under_torchrun_matches_one_process(workspace, tmp_path):
    """Two gloo ranks (CPU) train on exactly the samples one process trains on: same parameters up to float
    reduction order."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    model, data = workspace
    run(model, data, tmp_path / "single", "--checkpoint-every", "0")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ctxext_kernels.pose.train",
               "--model", str(model), "--data", str(data), "--output", str(tmp_path / "ddp"), "--original-window",
               str(TINY_WINDOW // 2), "--target-length", str(LT), "--steps", "4", "--global-batch", "4",
               "--micro-batch", "1", "--warmup-steps", "2", "--lr", "1e-3", "--quiet", "--no-kernels",
               "--trained-window", str(TINY_WINDOW), "--checkpoint-every", "0"]
    subprocess.run(command, check=True, capture_output=True, timeout=240)
    single = AutoModelForCausalLM.from_pretrained(tmp_path / "single").state_dict()
    ddp = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp").state_dict()
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, rtol=0, atol=1e-6)
