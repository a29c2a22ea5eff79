"""ctxext-train and ctxext-eval as command-line tools: nonsense is refused before the model loads, every error is one
line (a traceback only with --debug), one run at a time per --output, and eval keeps what it computed."""

import fcntl
import json
import sys

import pytest

from ctxext_kernels.pose import eval as pose_eval
from ctxext_kernels.pose import train as pose_train
from pose_fixtures import save_tiny_llama, train_argv, write_corpus


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pose_cli")
    return save_tiny_llama(root / "model"), write_corpus(root / "corpus", documents=4)


@pytest.fixture
def no_model_load(monkeypatch):
    """The checks under test must come before the model loads: loading it fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(pose_train, "load_model", refuse)
    monkeypatch.setattr(pose_eval, "load_model", refuse)


def failing_main(main, argv, capsys, code=1) -> str:
    """Run a CLI that must fail with exit status `code`; return its one-line error."""
    with pytest.raises(SystemExit) as stop:  # any other exception (a traceback for the user) fails the test
        main(argv)
    if code == 2:  # argparse: the usage, then one error line
        assert stop.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]
    message = str(stop.value.code)  # sys.exit(message): printed to stderr, exit status 1
    assert message.startswith(("ctxext-train: error: ", "ctxext-eval: error: ")) and "\n" not in message
    return message


@pytest.mark.parametrize("flag, value, expected", [
    ("--rope-factor", "nan", "finite RoPE scale factor >= 1"),
    ("--rope-factor", "0.5", "finite RoPE scale factor >= 1"),
    ("--global-batch", "0", "positive integer"),
    ("--micro-batch", "0", "positive integer"),
    ("--trained-window", "0", "positive integer"),
    ("--keep-checkpoints", "-1", "positive integer"),
    ("--target-length", str(2**24 + 1), "above 2^24"),
    ("--lr", "inf", "finite number > 0"),
    ("--steps", "0", "positive integer"),
    ("--warmup-steps", "-1", "integer >= 0"),
    ("--seed", "-1", "integer >= 0"),
    ("--max-grad-norm", "nan", "finite number > 0"),
])
def test_train_refuses_a_nonsense_argument(workspace, tmp_path, no_model_load, capsys, flag, value, expected):
    model, data = workspace
    message = failing_main(pose_train.main, train_argv(model, data, tmp_path / "out", flag, value), capsys, code=2)
    assert flag in message and expected in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, expected", [
    (("--global-batch", "6", "--micro-batch", "4"), "--global-batch 6 is not a multiple of --micro-batch"),
    (("--original-window", "300"), "--original-window 300 must be smaller than --target-length 256"),
    (("--num-chunks", "33"), "--num-chunks 33 is more than --original-window 32"),
    (("--data", "/nonexistent/corpus"), "--data /nonexistent/corpus does not exist"),
    (("--model", "/nonexistent/model"), "model /nonexistent/model does not exist"),
    (("--resume", "/nonexistent/step-1"), "--resume /nonexistent/step-1 is not a checkpoint folder"),
])
def test_train_cross_checks_before_loading(workspace, tmp_path, no_model_load, capsys, change, expected):
    model, data = workspace
    assert expected in failing_main(pose_train.main, train_argv(model, data, tmp_path / "out", *change), capsys)


@pytest.mark.parametrize("flag, value, expected", [
    ("--trials", "0", "positive integer"),
    ("--trials", "-1", "positive integer"),
    ("--lengths", "300,abc", "not an integer"),
    ("--lengths", "300,1", "every length must be >= 2"),
    ("--depths", "0.5,1.5", "not in [0, 1]"),
    ("--stride", "0", "positive integer"),
    ("--rope-factor", "nan", "finite RoPE scale factor"),
])
def test_eval_refuses_a_nonsense_argument(workspace, tmp_path, no_model_load, capsys, flag, value, expected):
    model, _ = workspace
    argv = ["passkey", "--model", str(model), "--lengths", "300", "--output", str(tmp_path / "eval"), flag, value]
    message = failing_main(pose_eval.main, argv, capsys, code=2)
    assert flag in message and expected in message


def test_gguf_without_the_gguf_package_is_refused_before_loading(workspace, tmp_path, no_model_load, monkeypatch,
                                                                  capsys):
    model, data = workspace
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # not installed
    message = failing_main(pose_train.main, train_argv(tmp_path / "model.gguf", data, tmp_path / "out"), capsys)
    assert "needs the gguf package: pip install gguf (or ctxext_kernels[pose])" in message


def test_output_that_is_a_file_is_refused_before_loading(workspace, tmp_path, no_model_load, capsys):
    model, data = workspace
    file = tmp_path / "a_file"
    file.write_text("mine")
    for main, argv in ((pose_train.main, train_argv(model, data, file)),
                       (pose_eval.main, ["ppl", "--model", str(model), "--lengths", "64", "--output", str(file)])):
        assert f"--output {file} is a file" in failing_main(main, argv, capsys)
    assert file.read_text() == "mine"


def test_a_second_run_on_one_output_is_refused(workspace, tmp_path, no_model_load, capsys):
    model, data = workspace
    output = tmp_path / "out"
    output.mkdir()
    with (output / ".lock").open("w") as held:  # what the first run holds while it runs
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("ctxext-train pid 12345\n")
        held.flush()
        for main, argv in ((pose_train.main, train_argv(model, data, output)),
                           (pose_eval.main, ["ppl", "--model", str(model), "--lengths", "64", "--output",
                                             str(output)])):
            message = failing_main(main, argv, capsys)
            assert f"--output {output} is in use by another run (ctxext-train pid 12345" in message


def test_debug_shows_the_exception(workspace, tmp_path):
    model, data = workspace
    with pytest.raises(ValueError, match="not a multiple"):
        pose_train.main(train_argv(model, data, tmp_path / "out", "--global-batch", "6", "--micro-batch", "4",
                                   "--debug"))


def test_bad_training_data_is_named(workspace, tmp_path, capsys):
    model, _ = workspace
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(json.dumps({"text": "x" * 100}) + "\n{not json\n")
    assert f"{jsonl}:2: not valid JSON" in failing_main(pose_train.main, train_argv(model, jsonl, tmp_path / "a"),
                                                          capsys)
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    parquet = tmp_path / "data.parquet"
    pq.write_table(pyarrow.table({"body": ["x" * 100]}), parquet)
    message = failing_main(pose_train.main, train_argv(model, parquet, tmp_path / "b"), capsys)
    assert f"{parquet} has no column 'text' (columns: ['body'])" in message


def test_truncated_gguf_is_named(tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(tmp_path / "model.gguf", "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((64, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    whole = (tmp_path / "model.gguf").read_bytes()
    (tmp_path / "model.gguf").write_bytes(whole[:len(whole) - 1000])
    message = failing_main(pose_eval.main, ["ppl", "--model", str(tmp_path / "model.gguf"), "--lengths", "64",
                                            "--output", str(tmp_path / "eval"), "--data", str(tmp_path)], capsys)
    assert f"model {tmp_path / 'model.gguf'} is not a readable GGUF file, truncated or corrupt" in message


def test_eval_without_matplotlib_keeps_the_results(workspace, tmp_path, monkeypatch, capsys):
    """matplotlib is an optional extra: without it, the JSON and markdown are written and a warning says no plot."""
    model, data = workspace
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    pose_eval.main(["ppl", "--model", str(model), "--lengths", "64,128", "--stride", "32", "--data", str(data),
                    "--split", "all", "--documents", "1", "--output", str(tmp_path / "ppl"), "--no-kernels"])
    report = json.loads((tmp_path / "ppl" / "ppl.json").read_text())
    assert report["complete"] and [r["length"] for r in report["results"]] == [64, 128]
    assert (tmp_path / "ppl" / "ppl.md").exists() and not (tmp_path / "ppl" / "ppl.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_eval_checks_every_length_before_evaluating(workspace, tmp_path, monkeypatch, capsys):
    model, _ = workspace
    calls = []
    monkeypatch.setattr(pose_eval, "greedy_answer", lambda *args: calls.append(1) or [])
    message = failing_main(pose_eval.main, ["passkey", "--model", str(model), "--lengths", "300,40", "--trials", "1",
                                            "--output", str(tmp_path / "pk"), "--no-kernels"], capsys)
    assert "length 40 is too short for the passkey template" in message and not calls


def test_eval_keeps_the_lengths_done_when_a_later_one_fails(workspace, tmp_path, monkeypatch, capsys):
    model, _ = workspace
    answers = iter([[], [], RuntimeError("CUDA out of memory (simulated)")])

    def answer(*args):
        result = next(answers)
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(pose_eval, "greedy_answer", answer)
    message = failing_main(pose_eval.main, ["passkey", "--model", str(model), "--lengths", "300,400", "--trials", "2",
                                            "--output", str(tmp_path / "pk"), "--no-kernels"], capsys)
    assert "CUDA out of memory (simulated)" in message
    report = json.loads((tmp_path / "pk" / "passkey.json").read_text())
    assert not report["complete"] and [r["length"] for r in report["results"]] == [300]
    assert report["results"][0]["trials"] == 2
    assert "Incomplete: 1 of 2 lengths" in (tmp_path / "pk" / "passkey.md").read_text()
