"""`import ctxext_kernels` is the monkey-patch (lazily, per family), CTXEXT_NO_PATCH=1 opts out; fresh interpreters."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

PROBE = """
import sys
{before}
import ctxext_kernels as ck
assert "transformers.models.llama.modeling_llama" in sys.modules or not ck.is_patched("llama")
from transformers.models.llama import modeling_llama
from transformers.models.qwen2 import modeling_qwen2
print(ck.is_patched("llama"), ck.is_patched("qwen2"), ck.is_patched("mistral"),
      hasattr(modeling_llama.apply_rotary_pos_emb, "__wrapped_by_ctxext__"))
"""


def probe(before: str = "", **env) -> str:
    result = subprocess.run([sys.executable, "-c", PROBE.format(before=before)], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_import_patches_families_as_they_load():
    """Families imported after the package are patched on load; ones never imported stay untouched."""
    assert probe(CTXEXT_NO_PATCH="0") == ["True", "True", "False", "True"]


def test_families_loaded_before_the_import_are_patched_too():
    assert probe("from transformers.models.mistral import modeling_mistral", CTXEXT_NO_PATCH="0") == [
        "True", "True", "True", "True"]


def test_environment_opt_out_keeps_transformers_stock():
    assert probe(CTXEXT_NO_PATCH="1") == ["False", "False", "False", "False"]
