"""`python -m ctxext_kernels.env` runs anywhere and reports every piece, also when pieces are missing."""

import json
import subprocess
import sys

import torch

from ctxext_kernels import env


def _run(*args):
    return subprocess.run([sys.executable, "-m", "ctxext_kernels.env", *args], capture_output=True, text=True,
                          check=True).stdout


def test_json_report_has_every_field():
    report = json.loads(_run("--json"))
    for key in ("ctxext_kernels", "python", "torch", "torch_cuda", "extension", "transformers", "triton", "flash_attn",
                "liger_kernel", "gpus", "backends"):
        assert key in report, key
    assert report["torch"] == torch.__version__
    assert report["ctxext_kernels"] not in ("", "unknown")
    assert set(report["backends"]["rope"]) == {"cuda", "triton", "cpu", "torch"}
    assert report["backends"]["rope"]["torch"]["usable"] is True
    assert all(entry["reason"] for table in report["backends"].values() for entry in table.values())
    assert len(report["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_text_report_and_help():
    text = _run()
    assert text.startswith("ctxext_kernels") and "rope:torch" in text and "attention:torch" in text
    assert "usage: ctxext-env" in _run("--help")


def test_missing_pieces_are_reported_not_raised(monkeypatch):
    # an import of None in sys.modules raises ImportError: stands for an unbuilt extension / uninstalled package
    monkeypatch.setitem(sys.modules, "ctxext_kernels._C", None)
    monkeypatch.setitem(sys.modules, "ctxext_kernels._version", None)
    monkeypatch.setitem(env.PEERS, "not_a_peer", "surely-not-an-installed-distribution")

    def broken_backends():
        raise RuntimeError("driver exploded")

    monkeypatch.setattr("ctxext_kernels.ops.attention_backends", broken_backends)
    report = env.collect()
    assert report["extension"]["built"] is False and report["extension"]["reason"].startswith("not built")
    assert report["ctxext_kernels"] == "unknown"
    assert report["not_a_peer"] == env.NOT_INSTALLED
    assert report["backends"]["attention"] == {"error": "RuntimeError: driver exploded"}
    assert report["backends"]["rope"]["torch"]["usable"] is True  # one family failing leaves the other
    text = env.format_text(report)
    assert "extension" in text and "not built" in text and "attention backends  RuntimeError: driver exploded" in text


def test_gpu_arch_against_compiled_archs():
    # SASS + PTX per arch: an sm_90 build runs on sm_90 and later GPUs, never on earlier ones
    assert env._arch_compiled_in("90", ["80", "90a"]) and env._arch_compiled_in("100", ["90"])
    assert not env._arch_compiled_in("86", ["90"]) and not env._arch_compiled_in("90", [])
    report = env.collect()
    report["gpus"] = [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "sm": "90", "extension_has_code": True}]
    assert "NVIDIA H100 80GB HBM3 (sm_90, extension code: yes)" in env.format_text(report)
