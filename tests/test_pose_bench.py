"""bench_pose_vs_full --smoke: both methods at every length, activation memory flat for PoSE and linear for full."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_pose_vs_full  # noqa: E402


def test_smoke_run_writes_the_comparison(tmp_path):
    bench_pose_vs_full.main(["--smoke", "--repeats", "1", "--output", str(tmp_path)])
    report = json.loads((tmp_path / "pose_vs_full.json").read_text())
    memory = {(r["provider"], r["case"]["target_length"]): r["metrics"]["saved_activations_mib"]
              for r in report["results"]}
    lengths = sorted({length for _, length in memory})
    assert lengths == [64, 128, 256]
    # PoSE trains Lc tokens whatever Lt is; full-length activations grow with Lt (at least linearly)
    assert len({round(memory["pose", length], 6) for length in lengths}) == 1
    assert memory["full", 256] >= 1.9 * memory["full", 128] >= 1.9 * 1.9 * memory["full", 64]
    assert memory["full", 64] > memory["pose", 64]
    for suffix in ("json", "md", "png"):
        assert (tmp_path / f"pose_vs_full.{suffix}").exists() and (tmp_path / f"pose_vs_full_time.{suffix}").exists()
