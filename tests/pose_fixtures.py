"""A tiny random LLaMA and a byte-level tokenizer saved as a transformers folder, for the PoSE tests."""

from pathlib import Path

import torch

TINY_WINDOW = 64  # the tiny model's max_position_embeddings ("trained window")


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: one token per UTF-8 byte (vocabulary 256 + eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: index for index, char in enumerate(sorted(alphabet))}
    vocab["</s>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="</s>")


def save_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """Save a 2-layer random LlamaForCausalLM (window 64, rope_theta 10000) and the byte tokenizer to `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TINY_WINDOW,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_corpus(folder: Path, documents: int = 12, words: int = 120) -> Path:
    """A folder of text files, one document each, of deterministic pseudo-English."""
    folder.mkdir(parents=True, exist_ok=True)
    vocabulary = "the grass is green sky blue sun yellow here we go there and back again".split()
    generator = torch.Generator().manual_seed(0)
    for index in range(documents):
        picks = torch.randint(len(vocabulary), (words,), generator=generator).tolist()
        (folder / f"doc{index:02d}.txt").write_text(" ".join(vocabulary[p] for p in picks))
    (folder / "short.txt").write_text("too short")
    return folder


def train_argv(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    """ctxext-train arguments for a 4-step run on the tiny model (Lc 32, Lt 256, 2 x 2 samples per step, CPU)."""
    return ["--model", str(model), "--data", str(data), "--output", str(output), "--original-window",
            str(TINY_WINDOW // 2), "--target-length", str(4 * TINY_WINDOW), "--steps", "4", "--global-batch", "4",
            "--micro-batch", "2", "--warmup-steps", "2", "--lr", "1e-3", "--quiet", "--no-kernels",
            "--trained-window", str(TINY_WINDOW), *extra]


def model_weights(folder: Path) -> dict:
    """The tensors of a saved model folder's model.safetensors."""
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
