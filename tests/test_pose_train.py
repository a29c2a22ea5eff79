"""ctxext-train on a tiny random LLaMA: finite loss, bit-exact resume, a stock-loadable extended model, resumes that
refuse changed settings or data, checkpoints that load no code."""

import hashlib
import json
import os
import shutil

import pytest
import torch

from ctxext_kernels.pose import train as pose_train
from ctxext_kernels.pose.checkpoint import SUMS_FILE
from pose_fixtures import TINY_WINDOW, save_tiny_llama, train_argv, write_corpus

LT = 4 * TINY_WINDOW
# these runs simulate an interruption by a shorter --steps, which the linear decay (ending at --steps) refuses on resume
CONSTANT = ("--schedule", "constant")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pose_train")
    return save_tiny_llama(root / "model"), write_corpus(root / "corpus")


def run(model, data, output, *extra):
    pose_train.main(train_argv(model, data, output, *extra))


def test_train_resume_and_output(workspace, tmp_path):
    model, data = workspace
    run(model, data, tmp_path / "straight", "--checkpoint-every", "0", *CONSTANT)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))

    # interrupted after step 2 (a checkpoint at step 2, stopped), then resumed to step 4
    run(model, data, tmp_path / "resumed", "--checkpoint-every", "2", "--steps", "3", *CONSTANT)
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["step-0000002"]
    run(model, data, tmp_path / "resumed", "--checkpoint-every", "2", *CONSTANT)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the interrupted run's step 3 was replaced by the resumed run's
    record = json.loads((tmp_path / "resumed" / "pose_training.json").read_text())
    assert [(s["from_step"], s["settings"]["steps"]) for s in record["segments"]] == [(0, 3), (2, 4)]

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


@pytest.fixture(scope="module")
def interrupted(workspace, tmp_path_factory):
    """An output folder whose run stopped after step 3 with a checkpoint at step 2."""
    model, data = workspace
    output = tmp_path_factory.mktemp("interrupted") / "out"
    run(model, data, output, "--checkpoint-every", "2", "--steps", "3", *CONSTANT)
    return output


def tree_digest(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("change, named", [
    (("--lr", "0.5"), "--lr 0.001 in the checkpoint, 0.5 now"),
    (("--weight-decay", "0.1"), "--weight-decay 0.0 in the checkpoint, 0.1 now"),
    (("--warmup-steps", "3"), "--warmup-steps 2 in the checkpoint, 3 now"),
    (("--seed", "1"), "--seed 0 in the checkpoint, 1 now"),
    (("--schedule", "linear"), "--schedule constant in the checkpoint, linear now"),
    (("--chunk-lengths", "authors"), "--chunk-lengths paper in the checkpoint, authors now"),
    (("--steps", "1"), "is at step 2, past --steps 1"),
    (("--data", "OTHER"), "was trained on other data: token stream SHA-256"),
    (("--model", "OTHER"), "from another model config: rms_norm_eps 1e-06 in the checkpoint, 0.001 now"),
])
def test_resume_refuses_changed_settings(workspace, interrupted, tmp_path, change, named):
    """Each changed setting that decides the result is refused, naming it and both values; nothing is written."""
    model, data = workspace
    if change[0] == "--data":  # as many documents as the original data, other words
        change = ("--data", str(write_corpus(tmp_path / "other", documents=12, words=121)))
    if change[0] == "--model":  # same shapes, another config value
        shutil.copytree(model, tmp_path / "other")
        config = json.loads((tmp_path / "other" / "config.json").read_text())
        (tmp_path / "other" / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
        change = ("--model", str(tmp_path / "other"))
    before = tree_digest(interrupted)
    with pytest.raises(SystemExit, match=named):
        run(model, data, interrupted, "--checkpoint-every", "2", *CONSTANT, *change)
    assert tree_digest(interrupted) == before


def test_unusable_checkpoints_are_named(workspace, tmp_path):
    model, data = workspace
    checkpoint = tmp_path / "out" / "checkpoints" / "step-0000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.pt").write_bytes(b"not a checkpoint")
    (checkpoint / "meta.json").write_text('{"step": 1, "complete": true}')
    with pytest.raises(SystemExit, match=f"no checkpoint in .* can be used: checkpoint {checkpoint} is incomplete"):
        run(model, data, tmp_path / "out")
    with pytest.raises(SystemExit, match="--resume never, but .* holds checkpoints of an earlier run"):
        run(model, data, tmp_path / "out", "--resume", "never")


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_loading_a_checkpoint_runs_no_code(workspace, interrupted, tmp_path):
    """A genuine checkpoint whose state.pt is replaced by a pickled call, with checksums to match, is refused
    without running the call: checkpoints are read with torch.load(weights_only=True)."""
    model, data = workspace
    output = tmp_path / "out"
    shutil.copytree(interrupted, output)
    checkpoint = output / "checkpoints" / "step-0000002"
    marker = tmp_path / "code_ran"
    torch.save({"model": RunsCode(str(marker))}, checkpoint / "state.pt")
    sums = [f"{hashlib.sha256((checkpoint / n).read_bytes()).hexdigest()}  {n}\n" for n in ("state.pt", "meta.json")]
    (checkpoint / SUMS_FILE).write_text("".join(sums))
    with pytest.raises(SystemExit, match="step-0000002 cannot be read"):
        run(model, data, output, "--checkpoint-every", "2", *CONSTANT)
    assert not marker.exists()


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
               *train_argv(model, data, tmp_path / "ddp", "--micro-batch", "1", "--checkpoint-every", "0")]
    subprocess.run(command, check=True, capture_output=True, timeout=240)
    single = AutoModelForCausalLM.from_pretrained(tmp_path / "single").state_dict()
    ddp = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp").state_dict()
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("warmup, total", [(10, 1000), (2, 4), (0, 5), (7, 7), (3, 50)])
def test_linear_schedule_is_transformers_get_linear_schedule_with_warmup(warmup, total):
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    oracle = get_linear_schedule_with_warmup(optimizer, warmup, total)
    ours = pose_train.lr_multiplier("linear", warmup, total)
    for k in range(total + 1):
        assert ours(k) == pytest.approx(oracle.get_last_lr()[0], abs=1e-12), k
        optimizer.step()
        oracle.step()


def test_linear_schedule_run_and_bit_exact_resume(workspace, tmp_path):
    """The default schedule: each step's recorded lr is transformers' linear schedule (warm-up 2, 0 after step 4), and
    a run resumed from its step-2 checkpoint ends with the same weights; a resume with another --steps is refused."""
    from transformers import AutoModelForCausalLM

    model, data = workspace
    run(model, data, tmp_path / "out", "--checkpoint-every", "2")
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.0, 0.5e-3, 1e-3, 0.5e-3])
    straight = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    shutil.copytree(tmp_path / "out" / "checkpoints", tmp_path / "again" / "checkpoints")
    run(model, data, tmp_path / "again", "--checkpoint-every", "2")
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "again").state_dict()
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name
    with pytest.raises(SystemExit, match="--steps 4 in the checkpoint, 5 now"):
        run(model, data, tmp_path / "again", "--checkpoint-every", "2", "--steps", "5")


def test_ntk_is_the_papers_static_ntk_and_loads_in_stock_transformers(workspace, tmp_path):
    """--rope-type ntk: rope_theta' = rope_theta x s^(d/(d-2)) saved as a "default" RoPE; stock transformers' inv_freq
    of the saved model is rope_theta'^(-2i/d), whose lowest frequency is the original's divided by s exactly."""
    from transformers import AutoModelForCausalLM

    model, data = workspace
    run(model, data, tmp_path / "ntk", "--rope-type", "ntk", "--steps", "1", "--global-batch", "2",
        "--checkpoint-every", "0")
    factor, theta, d = LT / TINY_WINDOW, 10000.0, 8  # the tiny model: head_dim 32 / 4 heads, rope_theta 1e4
    new_theta = theta * factor ** (d / (d - 2))
    saved = json.loads((tmp_path / "ntk" / "config.json").read_text())
    assert saved["max_position_embeddings"] == LT
    assert saved["rope_parameters"]["rope_type"] == "default"
    assert saved["rope_parameters"]["rope_theta"] == pytest.approx(new_theta, rel=1e-12)
    record = json.loads((tmp_path / "ntk" / "pose_training.json").read_text())["rope_scaling"]
    assert (record["rope_type"], record["factor"], record["original_rope_theta"]) == ("ntk", factor, theta)
    inv_freq = AutoModelForCausalLM.from_pretrained(tmp_path / "ntk").model.rotary_emb.inv_freq.double()
    expected = new_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    torch.testing.assert_close(inv_freq, expected, rtol=1e-6, atol=0)
    assert expected[-1].item() == pytest.approx(theta ** (-(d - 2) / d) / factor, rel=1e-12)


def test_dynamic_and_bad_combinations_are_refused_before_loading(workspace, tmp_path):
    model, data = workspace
    for extra, message in [(("--rope-type", "dynamic"), "--rope-type dynamic cannot train a window.*--rope-type ntk"),
                           (("--chunk-lengths", "authors", "--num-chunks", "3"), "needs --num-chunks 2, got 3"),
                           (("--method", "full", "--min-document-tokens", "100"),
                            f"--min-document-tokens 100 is less than the {LT} tokens")]:
        with pytest.raises(SystemExit, match=message):
            run(model, data, tmp_path / "out", *extra)
        assert not (tmp_path / "out").exists()


def test_chunk_lengths_reach_the_sampler(workspace, tmp_path, monkeypatch):
    made = []

    class Recording(pose_train.PoseSampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self.chunk_lengths)

    monkeypatch.setattr(pose_train, "PoseSampler", Recording)
    model, data = workspace
    run(model, data, tmp_path / "out", "--chunk-lengths", "authors", "--steps", "1", "--global-batch", "2",
        "--checkpoint-every", "0")
    assert made and set(made) == {"authors"}


def test_min_document_tokens_gives_pose_the_full_baselines_documents(workspace, tmp_path):
    """A document longer than Lc but shorter than Lt: PoSE keeps it by default, the full-length baseline cannot;
    with --min-document-tokens Lt both train on the same token stream."""
    model, data = workspace
    corpus = tmp_path / "corpus"
    shutil.copytree(data, corpus)
    (corpus / "middle.txt").write_text("x" * (LT // 2))  # one token per byte: Lc < LT/2 < Lt
    # --split all: the added document happens to be one of the held-out tenth training skips by default
    one_step = ("--steps", "1", "--global-batch", "2", "--checkpoint-every", "0", "--split", "all")

    def data_record(name, *extra):
        run(model, corpus, tmp_path / name, *one_step, *extra)
        return json.loads((tmp_path / name / "pose_training.json").read_text())["data"]

    pose, full = data_record("pose"), data_record("full", "--method", "full")
    same = data_record("same", "--min-document-tokens", str(LT))
    assert pose["documents"] == full["documents"] + 1
    assert same == full


@pytest.mark.parametrize("method", ["pose", "full"])
def test_samples_start_with_the_bos_the_tokenizer_adds(workspace, tmp_path, monkeypatch, method):
    """A tokenizer whose post-processor puts BOS first: every training sample starts with it at position 0."""
    from tokenizers import processors

    from pose_fixtures import byte_tokenizer

    model, data = workspace
    shutil.copytree(model, tmp_path / "model")
    tokenizer = byte_tokenizer()
    bos = tokenizer.convert_tokens_to_ids("</s>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="</s> $A",
                                                                               special_tokens=[("</s>", bos)])
    tokenizer.bos_token = "</s>"
    tokenizer.save_pretrained(tmp_path / "model")
    starts = []

    class Recording(pose_train.PoseSampler):
        def sample(self, tokens):
            ids, positions = super().sample(tokens)
            starts.append((int(ids[0]), int(positions[0])))
            return ids, positions

    monkeypatch.setattr(pose_train, "PoseSampler", Recording)
    run(tmp_path / "model", data, tmp_path / "out", "--method", method, "--steps", "1", "--global-batch", "2",
        "--checkpoint-every", "0")
    assert starts and set(starts) == {(bos, 0)}
    assert json.loads((tmp_path / "out" / "pose_training.json").read_text())["data"]["bos_token_id"] == bos


def test_resume_refuses_another_bos():
    from types import SimpleNamespace

    checkpoint = SimpleNamespace(path="ckpt", meta={"bos_token_id": None, "data_sha256": "0", "model_config": {}})
    pose_train.check_resume_inputs(checkpoint, "0", 1, {}, None)
    with pytest.raises(ValueError, match="BOS token None first in every sample, this tokenizer adds 1"):
        pose_train.check_resume_inputs(checkpoint, "0", 1, {}, 1)
