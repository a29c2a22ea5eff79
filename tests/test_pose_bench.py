"""bench_pose_vs_full --smoke: both methods at every length, activation memory flat for PoSE and linear for full."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_pose_vs_full  # noqa: E402


def test_smoke_run_writes_the_comparison(tmp_path):
    bench_pose_vs_full.main(["--smoke", "--repeats", "1", "--output", str(tmp_path)])
    report = json.loads((tmp_path / "bench_pose_vs_full.json").read_text())
    memory = {(r["provider"], r["case"]["target_length"]): r["metrics"]["saved_activations_mib"]
              for r in report["results"]}
    lengths = sorted({length for _, length in memory})
    assert lengths == [64, 128, 256]
    # PoSE trains Lc tokens whatever Lt is; full-length activations grow with Lt (at least linearly)
    assert len({round(memory["pose", length], 6) for length in lengths}) == 1
    assert memory["full", 256] >= 1.9 * memory["full", 128] >= 1.9 * 1.9 * memory["full", 64]
    assert memory["full", 64] > memory["pose", 64]
    assert [r["case"]["target_length"] for r in report["results"]] == [256, 256, 128, 128, 64, 64]  # longest first
    assert report["status"] == {**report["status"], "finished": True, "measured": 6, "not_run": 0}
    for suffix in (".json", ".md", ".png", "_time.png"):
        assert (tmp_path / f"bench_pose_vs_full{suffix}").exists(), suffix


def test_full_length_is_not_tried_past_its_first_oom(monkeypatch):
    """In either order of lengths: once full-length runs out of memory at Lt, every Lt' >= Lt is recorded as OOM
    without a try, and the shorter ones are still measured."""
    tried = []

    def fake_step_cost(model, method, original_window, target_length, samples, repeats, max_ms=None):
        tried.append((method, target_length))
        case = bench_pose_vs_full.step_case(method, original_window, target_length, samples)
        if method == "full" and target_length >= 128:
            return bench_pose_vs_full.harness.skipped("pose_vs_full", method, case, "OOM")
        return bench_pose_vs_full.harness.Result("pose_vs_full", method, case, {"ms_p50": 1.0})

    monkeypatch.setattr(bench_pose_vs_full, "step_cost", fake_step_cost)
    for lengths, full_tried in (([64, 128, 256], [64, 128]), ([128, 256, 64], [128, 64])):
        tried.clear()
        results = bench_pose_vs_full.cost_sweep(None, 32, lengths, 2, 1, progress=lambda line: None)
        assert [length for method, length in tried if method == "full"] == full_tried
        oom = {r.case["target_length"] for r in results if r.skipped == "OOM"}
        assert oom == {128, 256} and all(r.case["tokens"] == 2 * (32 if r.provider == "pose" else
                                                                   r.case["target_length"]) for r in results)
