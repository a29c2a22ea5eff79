"""transformers' common model tests (`ModelTesterMixin` of the installed version's `tests/test_modeling_common.py`)
for every family ctxext_kernels patches.

Copied next to transformers' own test files by scripts/test_transformers_suite.sh and run twice, stock and patched.
transformers' per-family test files (tests/models/<family>/) and `causal_lm_tester.py` are not in its sdist: the
tester below rebuilds what they set up (the same tiny random model: 2 layers, hidden 32, 2 heads, 7 tokens, batch
13), written here from what `ModelTesterMixin` reads off its tester.
"""

import inspect
import os
import unittest

import torch
import transformers
from transformers.testing_utils import require_torch, torch_device

from .generation.test_utils import GenerationTesterMixin
from .test_modeling_common import ModelTesterMixin, ids_tensor

# model_type -> class-name prefix (transformers.<Prefix>Model, <Prefix>ForCausalLM, <Prefix>Config)
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma",
            "gemma2": "Gemma2", "phi3": "Phi3", "granite": "Granite", "olmo": "Olmo", "olmo2": "Olmo2"}
HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")


class FamilyTester:
    """What `ModelTesterMixin` reads off `self.model_tester`, with causal_lm_tester's sizes."""

    batch_size, seq_length, vocab_size = 13, 7, 99
    hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads = 32, 2, 2, 2
    intermediate_size, hidden_act, max_position_embeddings = 37, "gelu", 512
    hidden_dropout_prob = attention_probs_dropout_prob = 0.1
    initializer_range, num_labels, num_choices, type_sequence_label_size = 0.02, 3, 4, 2
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    is_training, use_labels = True, True

    def __init__(self, parent, prefix: str):
        self.parent = parent
        self.config_class = getattr(transformers, f"{prefix}Config")
        self.base_model_class = getattr(transformers, f"{prefix}Model")
        self.causal_lm_class = getattr(transformers, f"{prefix}ForCausalLM")
        self.head_dim = self.hidden_size // self.num_attention_heads
        self.tie_word_embeddings = False

    def get_config(self):
        names = set(inspect.signature(self.config_class.__init__).parameters) | {"pad_token_id"}
        config = self.config_class(**{name: getattr(self, name) for name in names if hasattr(self, name)})
        if os.environ.get("CTXEXT_SUITE_ATTN"):  # every model the tests build from this config uses that backend
            config._attn_implementation = os.environ["CTXEXT_SUITE_ATTN"]
        return config

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = torch.tril(torch.ones_like(input_ids)).to(torch_device)
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


def _test_case(model_type: str, prefix: str) -> type:
    classes = [getattr(transformers, f"{prefix}{suffix}") for suffix in ("Model", "ForCausalLM") + HEADS
               if hasattr(transformers, f"{prefix}{suffix}")]

    def setUp(self):
        self.model_tester = FamilyTester(self, prefix)

    def test_ctxext_patch_state(self):
        """The run is what it says: patched (`CTXEXT_SUITE_PATCHED=1`) or stock."""
        from ctxext_kernels.integrations import is_patched
        self.assertEqual(is_patched(model_type), os.environ.get("CTXEXT_SUITE_PATCHED") == "1")

    return require_torch(type(f"{prefix}CtxextTest", (ModelTesterMixin, GenerationTesterMixin, unittest.TestCase),
                              {"all_model_classes": tuple(classes), "setUp": setUp,
                               "test_ctxext_patch_state": test_ctxext_patch_state}))


for _model_type, _prefix in FAMILIES.items():
    globals()[f"{_prefix}CtxextTest"] = _test_case(_model_type, _prefix)
