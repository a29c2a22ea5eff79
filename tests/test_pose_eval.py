"""ctxext-eval on a tiny random LLaMA: perplexity against an independent NLL (with and without BOS), passkey prompts and
depths, the held-out split, the refusal to rescale an already scaled model, the CLI's files."""

import json
import math
import random

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


def independent_nll(model, tokens: torch.Tensor, window: int, stride: int, bos: int | None = None) -> list[float]:
    """Per-token NLL (log-softmax in float64) from the definition: window k holds document tokens
    [k*stride, k*stride + window) (with `bos`: BOS then [k*stride, k*stride + window - 1), as the PoSE authors'
    eval_ppl.py); token t is scored by the first window holding it and its predecessor (BOS counts as one), with that
    window's tokens before t as context (without BOS and with stride == window the first token of each window has no
    such window and is not scored, as in transformers' perplexity guide)."""
    prefix = [] if bos is None else [bos]
    losses = {}
    for begin in range(0, len(tokens), stride):
        end = min(begin + window - len(prefix), len(tokens))
        ids = torch.tensor(prefix + tokens[begin:end].tolist())
        with torch.no_grad():
            log_probs = torch.log_softmax(model(ids[None]).logits[0].double(), -1)
        for t in range(begin + 1 - len(prefix), end):
            position = t - begin + len(prefix)  # index of token t in ids
            losses.setdefault(t, -float(log_probs[position - 1, tokens[t]]))  # first window scoring t keeps it
        if end == len(tokens):
            break
    return list(losses.values())


@pytest.mark.parametrize("window, stride, bos, scored", [(40, 40, None, 126), (40, 16, None, 129),
                                                         (200, 50, None, 129), (40, 39, 256, 130),
                                                         (40, 16, 256, 130)])
def test_sliding_window_perplexity_matches_definition(tiny, window, stride, bos, scored):
    _, model = tiny
    tokens = torch.randint(0, 200, (130,), generator=torch.Generator().manual_seed(1))
    total, count = pose_eval.sliding_window_nll(model, tokens, window, stride, bos)
    expected = independent_nll(model, tokens, window, stride, bos)
    assert count == len(expected) == scored
    assert math.isclose(total, sum(expected), rel_tol=1e-5)  # fp32 vs float64 log-softmax
    # every length scores the document cut to max_tokens (default the longest length), here all 130 tokens
    ppl = pose_eval.perplexity_by_length(model, [tokens], [window, 130], stride, bos, progress=False)[0]["perplexity"]
    assert math.isclose(ppl, math.exp(sum(expected) / len(expected)), rel_tol=1e-5)
    cut = pose_eval.perplexity_by_length(model, [tokens], [window], stride, bos, max_tokens=100, progress=False)[0]
    assert cut["scored_tokens"] == len(independent_nll(model, tokens[:100], window, stride, bos))
    with pytest.raises(ValueError, match="stride"):  # with BOS a window holds window - 1 document tokens
        pose_eval.sliding_window_nll(model, tokens, window, window if bos is not None else window + 1, bos)


@pytest.mark.parametrize("depths", [None, (0.25, 0.75)])
def test_passkey_prompts_leave_room_for_the_answer_and_draw_depths(monkeypatch, depths):
    tokenizer = byte_tokenizer()
    prompts = []

    def answer_with_the_key(model, prompt):  # an oracle model: reads the key back from the prompt
        prompts.append(prompt)
        key = tokenizer.decode(prompt).split("The pass key is ")[1][:5]
        return tokenizer(key, add_special_tokens=False)["input_ids"]

    monkeypatch.setattr(pose_eval, "greedy_answer", answer_with_the_key)
    result = pose_eval.passkey_accuracy(None, tokenizer, [400], trials=6, depths=depths, seed=3, progress=False)[0]
    assert result["accuracy"] == 1.0 and result["prompt_tokens"] == 400 - pose_eval.ANSWER_TOKENS
    assert all(p.numel() + pose_eval.ANSWER_TOKENS == 400 for p in prompts)  # prompt + answer fit in the length
    if depths is None:  # uniform in [0, 1], seeded: distinct, reproducible, no per-depth table
        assert len(set(result["depths"])) == 6 and all(0 <= d <= 1 for d in result["depths"])
        again = pose_eval.passkey_accuracy(None, tokenizer, [400], trials=6, seed=3, progress=False)[0]
        assert again["depths"] == result["depths"] and "accuracy_by_depth" not in result
    else:
        assert result["depths"] == [0.25, 0.75] * 3 and result["accuracy_by_depth"] == {"0.25": 1.0, "0.75": 1.0}


def test_heldout_split_is_a_fixed_tenth_by_content(tmp_path):
    rng = random.Random(0)
    texts = [" ".join(str(rng.random()) for _ in range(5)) for _ in range(2000)]
    held = [t for t in texts if pose_eval.is_heldout(t)]
    assert 150 <= len(held) <= 250  # 1 in 10 (binomial sd ~13)
    assert [pose_eval.is_heldout(t) for t in texts] == [pose_eval.is_heldout(t) for t in texts]
    folder = tmp_path / "docs"
    folder.mkdir()
    for index, text in enumerate(texts[:60]):
        (folder / f"{index:02d}.txt").write_text(text)
    tokenizer = byte_tokenizer()
    heldout = pose_eval.load_eval_documents(folder, tokenizer, 10, 100)
    assert sorted(tokenizer.decode(d) for d in heldout) == sorted(t for t in texts[:60] if pose_eval.is_heldout(t))
    assert len(pose_eval.load_eval_documents(folder, tokenizer, 10, 100, split="all")) == 60


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


def test_cli_refuses_to_rescale_a_scaled_model(tiny, tmp_path):
    from transformers import AutoConfig

    folder, _ = tiny
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "rope_parameters"):  # transformers 5
        config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    else:
        config.rope_scaling = {"rope_type": "linear", "factor": 2.0}
    scaled = tmp_path / "scaled"
    config.save_pretrained(scaled)
    for flags in (["--rope-type", "linear"], ["--rope-factor", "4"]):
        args = pose_eval.build_parser().parse_args(["passkey", "--model", str(scaled), "--lengths", "300",
                                                    "--output", str(tmp_path / "out"), *flags])
        with pytest.raises(ValueError, match="already scales RoPE \\(linear, factor 2.0\\)"):
            pose_eval.evaluate(args)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_cli_writes_json_markdown_and_png(tiny, tmp_path):
    folder, _ = tiny
    corpus = tmp_path / "corpus.jsonl"  # GovReport's layout: the text is in the "input" field
    texts = [path.read_text() for path in sorted(write_corpus(tmp_path / "corpus", documents=3, words=80).glob("doc*"))]
    corpus.write_text("".join(json.dumps({"input": text, "id": i}) + "\n" for i, text in enumerate(texts)))
    pose_eval.main(["ppl", "--model", str(folder), "--lengths", "64,128", "--stride", "32", "--data", str(corpus),
                    "--field", "input", "--split", "all", "--documents", "2", "--output", str(tmp_path / "ppl"),
                    "--no-kernels"])
    report = json.loads((tmp_path / "ppl" / "ppl.json").read_text())
    assert [r["length"] for r in report["results"]] == [64, 128] and report["settings"]["stride"] == 32
    assert all(r["documents"] == 2 and r["scored_tokens"] == report["results"][0]["scored_tokens"]
               for r in report["results"])
    assert all(r["perplexity"] > 1 for r in report["results"])
    pose_eval.main(["passkey", "--model", str(folder), "--lengths", "300", "--trials", "2", "--no-kernels",
                    "--output", str(tmp_path / "pk"), "--rope-type", "linear", "--rope-factor", "2"])
    report = json.loads((tmp_path / "pk" / "passkey.json").read_text())
    assert report["results"][0]["trials"] == 2 and 0 <= report["results"][0]["accuracy"] <= 1
    assert report["settings"]["rope_type"] == "linear"
    for task in ("ppl", "pk"):
        assert any((tmp_path / task).glob("*.png")) and any((tmp_path / task).glob("*.md"))
