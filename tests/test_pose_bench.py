"""bench_pose_vs_full --smoke: both methods at every length, activation memory flat for PoSE and linear for full; the
demo (scripts/demo.py) end to end on the tiny model."""

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


def test_demo_runs_every_arm_with_true_labels(tmp_path):
    """scripts/demo.py end to end on the tiny model (real window 64; simulated Lc 16, Lt 128): every arm evaluated,
    the trained arms trained for the same steps, and each length labelled by where it really lies."""
    import importlib.util

    from pose_fixtures import TINY_WINDOW, save_tiny_llama, write_corpus

    script = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"
    spec = importlib.util.spec_from_file_location("demo", script)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    model, corpus = save_tiny_llama(tmp_path / "model"), write_corpus(tmp_path / "corpus", documents=4)
    demo.main(["--model", str(model), "--train-data", str(corpus), "--eval-data", str(corpus), "--original-window",
               "16", "--target-length", "128", "--steps", "1", "--global-batch", "1", "--eval-lengths", "16,64",
               "--passkey-lengths", "", "--ppl-documents", "1", "--stride", "8", "--output", str(tmp_path / "demo")])
    report = json.loads((tmp_path / "demo" / "demo_results.json").read_text())
    assert report["real_window"] == TINY_WINDOW and list(report["arms"]) == list(demo.ARMS)
    for arm, (_, method) in demo.ARMS.items():
        assert [r["length"] for r in report["arms"][arm]["ppl"]] == [16, 64]
        assert len(report["arms"][arm].get("losses", [])) == (1 if method else 0)
    assert [r["method"] for r in report["step_costs"]] == ["pose", "full"]
    summary = (tmp_path / "demo" / "demo_results.md").read_text()
    assert "ppl 16 (≤ Lc)" in summary and "ppl 64 (> Lc, inside the real window)" in summary
    assert f"inside the model's real {TINY_WINDOW}-token window" in summary
    # a length past the real window is labelled so, and the "inside" note is not written then
    args = demo.build_parser().parse_args(["--original-window", "16", "--eval-lengths", "128", "--passkey-lengths", "",
                                           "--steps", "2"])
    row = {"ppl": [{"length": 128, "perplexity": 9.0}], "passkey": [], "train_seconds": 4.0}
    assert "ppl 128 (beyond the real window)" in demo.table({"pose": row}, args, TINY_WINDOW)
    assert demo.reading_note(args, TINY_WINDOW) == ""
