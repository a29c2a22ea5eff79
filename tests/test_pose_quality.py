"""benchmarks/bench_pose_quality.py --quick: every arm's plumbing on a tiny random LLaMA, resumable, and its NLL
against an independent implementation (ctxext-eval's sliding-window NLL)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("bench_pose_quality", ROOT / "benchmarks" / "bench_pose_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_every_arm_and_resumes(tmp_path):
    bench = _module()
    arms = "untouched,in_window,pose_linear2"
    bench.main(["--quick", "--output", str(tmp_path), "--arms", arms, "--quiet"])
    records = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in arms.split(",")}
    setup = records["untouched"]["setup"]
    for record in records.values():
        assert len(record["nll_bins"]) == setup["documents"]
    assert all(len(records[a]["passkey"][str(n)]) == setup["trials"] for a in ("untouched", "pose_linear2")
               for n in setup["passkey_lengths"])
    # inside the first window the in-window arm and one full forward score the same tokens with the same context
    for doc, bins in records["untouched"]["nll_bins"].items():
        first_window = [b for b in bins if b["start"] + setup["bin"] <= setup["window"]]
        for full, windowed in zip(first_window, records["in_window"]["nll_bins"][doc]):
            assert full["count"] == windowed["count"] and math.isclose(full["sum"], windowed["sum"], rel_tol=1e-6)
    summary = (tmp_path / "summary.md").read_text()
    assert "| pose_linear2 | 2/2 |" in summary and (tmp_path / "summary.png").exists()

    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.json")}
    bench.main(["--quick", "--output", str(tmp_path), "--arms", arms, "--quiet"])  # nothing left to do
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.json")} == before


def test_windowed_token_nll_matches_ctxext_eval(tmp_path):
    """token_nll's sliding windows (window W, stride W/2) against ctxext-eval's sliding_window_nll, and the single
    forward against the model's own loss."""
    from ctxext_kernels.pose import eval as pose_eval
    from ctxext_kernels.pose.modeling import load_model

    bench = _module()
    setup = bench.quick_setup(tmp_path, type("Args", (), {"trials": None, "steps": None})())
    model, _ = load_model(setup.model)
    model.eval()
    tokens = torch.randint(0, 200, (300,), generator=torch.Generator().manual_seed(0))
    windowed = bench.token_nll(model, tokens, window=128)
    total, count = pose_eval.sliding_window_nll(model, tokens, window=128, stride=64)
    assert int((~windowed.isnan()).sum()) == count and math.isclose(float(windowed.nansum()), total, rel_tol=1e-5)
    full = bench.token_nll(model, tokens)
    with torch.no_grad():
        loss = model(tokens[None], labels=tokens[None]).loss
    assert math.isclose(float(full.nanmean()), float(loss), rel_tol=1e-5)
