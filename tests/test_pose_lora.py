"""ctxext-train --lora-rank: both outputs load in stock transformers (+ PEFT for the adapter) with the extended RoPE
and give the logits of the model trained in process; the base weights stay frozen; impossible settings are named."""

import json

import re

import pytest
import torch

from ctxext_kernels.pose import train as pose_train
from ctxext_kernels.pose.modeling import load_model
from pose_fixtures import TINY_WINDOW, save_tiny_llama, write_corpus

LT = 4 * TINY_WINDOW
FACTOR = LT / TINY_WINDOW


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pose_lora")
    return save_tiny_llama(root / "model"), write_corpus(root / "corpus")


def arguments(model, data, output, *extra):
    return pose_train.build_parser().parse_args([
        "--model", str(model), "--data", str(data), "--output", str(output), "--original-window",
        str(TINY_WINDOW // 2), "--target-length", str(LT), "--steps", "2", "--global-batch", "2", "--micro-batch", "2",
        "--warmup-steps", "1", "--lr", "1e-2", "--quiet", "--no-kernels", "--trained-window", str(TINY_WINDOW),
        "--checkpoint-every", "0", "--lora-rank", "4", *extra])


def logits(model, tokens):
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


def train_in_process(workspace, output, lora_output):
    """Train with LoRA on a model loaded here; return it (trained in place) and the logits it gives afterwards."""
    model_path, data = workspace
    model, tokenizer = load_model(model_path, rope_type="linear", target_length=LT, trained_window=TINY_WINDOW)
    pose_train.train(arguments(model_path, data, output, "--lora-output", lora_output), model, tokenizer)
    return model


def test_lora_outputs_load_in_stock_transformers(workspace, tmp_path):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    model_path, _ = workspace
    tokens = torch.randint(256, (1, LT))  # the whole extended window, 4x the trained one
    untrained = logits(load_model(model_path, rope_type="linear", target_length=LT)[0], tokens)

    trained = train_in_process(workspace, tmp_path / "merged", "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.rope_parameters == {"rope_type": "linear", "rope_theta": 10000.0, "factor": FACTOR}
    assert merged.config.max_position_embeddings == LT
    merged_logits = logits(merged, tokens)
    torch.testing.assert_close(merged_logits, logits(trained, tokens), rtol=0, atol=0)
    assert (merged_logits - untrained).abs().max() > 1e-3  # the adapters learned something

    trained = train_in_process(workspace, tmp_path / "adapter", "adapter")
    in_process = logits(trained, tokens)
    saved = json.loads((tmp_path / "adapter" / "config.json").read_text())
    assert saved["rope_parameters"]["factor"] == FACTOR and saved["max_position_embeddings"] == LT
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(model_path.resolve())
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    # the documented recipe: the base model with the output's (extended) config, then the adapter
    base = AutoModelForCausalLM.from_pretrained(model_path, config=AutoConfig.from_pretrained(tmp_path / "adapter"))
    original_up = base.model.layers[0].mlp.up_proj.weight.clone()
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(logits(adapted, tokens), in_process, rtol=0, atol=0)
    # both outputs hold the same training (same seed, same samples): merging only reorders the arithmetic
    torch.testing.assert_close(in_process, merged_logits, rtol=1e-5, atol=1e-5)
    # LoRA froze the base: the in-process model's own weight is the original one
    assert torch.equal(trained.model.layers[0].mlp.up_proj.base_layer.weight, original_up)
    inv_freq = AutoModelForCausalLM.from_pretrained(model_path).model.rotary_emb.inv_freq
    torch.testing.assert_close(adapted.base_model.model.model.rotary_emb.inv_freq, inv_freq / FACTOR)


@pytest.mark.parametrize("extra, message", [
    (["--fsdp"], "--lora-rank with --fsdp is not supported"),
    (["--lora-rank", "0", "--lora-output", "adapter"], "need --lora-rank"),
])
def test_impossible_lora_settings_are_named(workspace, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        pose_train.train(arguments(*workspace, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [(["--lora-rank", "-1"], "--lora-rank: .* an integer >= 0"),
                                            (["--lora-alpha", "0"], "--lora-alpha: .* a finite number > 0")])
def test_out_of_range_lora_numbers_are_refused_by_the_parser(workspace, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        arguments(*workspace, tmp_path / "out", *extra)
    assert re.search(message, capsys.readouterr().err)


def test_adapter_output_refuses_a_gguf_model(workspace, tmp_path):
    args = arguments(tmp_path / "model.gguf", workspace[1], tmp_path / "out", "--lora-output", "adapter")
    with pytest.raises(ValueError, match="needs a transformers model folder"):
        pose_train.train(args)
