"""ctxext-eval on a tiny random LLaMA: perplexity against an independent NLL, passkey prompts, the CLI's files."""

import json
import math

import pytest
import torch

from ctxext_kernels.pose import eval as pose_eval
from pose_fixtures import byte_tokenizer, save_tiny_llama, write_corpus


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = save_tiny_llama(tmp_path_factory.mktemp("pose_eval") / "model")
    # fp32: the dtype the RoPE kernels take once ctxext_kernels patches transformers
    return folder, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def independent_nll(model, tokens: torch.Tensor, window: int, stride: int) -> list[float]:
    """Per-token NLL (log-softmax in float64) from the definition: windows [k*stride, k*stride + window); token t >= 1 is scored by
    the first window that contains it and t - 1, with that window's tokens before t as context (with stride == window
    the first token of each window has no such window and is not scored, as in transformers' perplexity guide)."""
    losses = {}
    for begin in range(0, len(tokens), stride):
        end = min(begin + window, len(tokens))
        with torch.no_grad():
            log_probs = torch.log_softmax(model(tokens[begin:end][None]).logits[0].double(), -1)
        for t in range(begin + 1, end):
            losses.setdefault(t, -float(log_probs[t - begin - 1, tokens[t]]))  # first window scoring t keeps it
        if end == len(tokens):
            break
    return list(losses.values())


@pytest.mark.parametrize("window, stride, scored", [(40, 40, 126), (40, 16, 129), (200, 50, 129)])
def test_sliding_window_perplexity_matches_definition(tiny, window, stride, scored):
    _, model = tiny
    tokens = torch.randint(0, 200, (130,), generator=torch.Generator().manual_seed(1))
    total, count = pose_eval.sliding_window_nll(model, tokens, window, stride)
    expected = independent_nll(model, tokens, window, stride)
    assert count == len(expected) == scored
    assert math.isclose(total, sum(expected), rel_tol=1e-5)  # fp32 vs float64 log-softmax
    # every length scores the document cut to the longest length, here all 130 tokens
    ppl = pose_eval.perplexity_by_length(model, [tokens], [window, 130], stride, progress=False)[0]["perplexity"]
    assert math.isclose(ppl, math.exp(sum(expected) / len(expected)), rel_tol=1e-5)


@pytest.mark.parametrize("length, depth", [(300, 0.0), (300, 0.5), (517, 0.25), (1000, 1.0)])
def test_passkey_prompt_length_and_depth(length, depth):
    tokenizer = byte_tokenizer()
    ids, key_start = pose_eval.passkey_prompt(tokenizer, 12345, length, depth)
    assert ids.numel() == length
    text = tokenizer.decode(ids)
    assert text.startswith(pose_eval.TASK_DESCRIPTION) and text.endswith(pose_eval.QUESTION)
    key_line = pose_eval.key_line(12345)
    # byte tokens: the key line starts (after its leading space) at key_start + 1 characters
    assert text[key_start + 1:].startswith(key_line)
    filler_total = len(text) - len(pose_eval.TASK_DESCRIPTION) - len(" " + key_line) - len(" " + pose_eval.QUESTION)
    filler_before = key_start - len(pose_eval.TASK_DESCRIPTION)
    assert abs(filler_before - depth * filler_total) <= 0.5
    assert text.count(pose_eval.FILLER) >= filler_total // (len(pose_eval.FILLER) + 1) - 2  # the filler repeats
    with pytest.raises(ValueError, match="too short"):
        pose_eval.passkey_prompt(tokenizer, 12345, 50, 0.5)


def test_cli_writes_json_markdown_and_png(tiny, tmp_path):
    folder, _ = tiny
    corpus = write_corpus(tmp_path / "corpus", documents=3, words=80)
    pose_eval.main(["ppl", "--model", str(folder), "--lengths", "64,128", "--stride", "32", "--data", str(corpus),
                    "--documents", "2", "--output", str(tmp_path / "ppl"), "--no-kernels"])
    report = json.loads((tmp_path / "ppl" / "ppl.json").read_text())
    assert [r["length"] for r in report["results"]] == [64, 128] and report["settings"]["stride"] == 32
    assert all(r["perplexity"] > 1 for r in report["results"])
    pose_eval.main(["passkey", "--model", str(folder), "--lengths", "300", "--trials", "2", "--no-kernels",
                    "--output", str(tmp_path / "pk"), "--rope-type", "linear", "--rope-factor", "2"])
    report = json.loads((tmp_path / "pk" / "passkey.json").read_text())
    assert report["results"][0]["trials"] == 2 and 0 <= report["results"][0]["accuracy"] <= 1
    assert report["settings"]["rope_type"] == "linear"
    for task in ("ppl", "pk"):
        assert any((tmp_path / task).glob("*.png")) and any((tmp_path / task).glob("*.md"))
