"""`python -m ctxext_kernels.env` runs anywhere and reports every piece."""

import json
import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "ctxext_kernels.env", *args], capture_output=True, text=True,
                          check=True).stdout


def test_json_report_has_every_field():
    report = json.loads(_run("--json"))
    for key in ("ctxext_kernels", "torch", "extension", "transformers", "triton", "flash_attn", "liger_kernel", "gpus",
                "rope_backends", "attention_backends"):
        assert key in report, key
    assert set(report["rope_backends"]) == {"cuda", "triton", "cpu", "torch"}
    assert report["rope_backends"]["torch"]["usable"] is True
    assert all(entry["reason"] for entry in report["rope_backends"].values())


def test_text_report_and_help():
    text = _run()
    assert "ctxext_kernels" in text and "rope:torch" in text
    assert "usage" in _run("--help")
