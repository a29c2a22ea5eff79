"""The dress rehearsal of the run on a lent GPU: benchmarks/run_all.sh --smoke runs both stages on the CPU (tiny
shapes, Triton's interpreter, the torch reference where a GPU would be) and writes every report, and what the device
tool would bring back is there. With `--budget 1` every benchmark measures its first row and marks the rest "not run",
so the run is short and its outcome deterministic."""

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what each stage runs, in order (the full sweeps of stage 2 are skipped in --smoke: the same tiny shapes as stage 1)
STAGES = {1: ["pytest_gpu", "bench_rope", "bench_attention"], 2: ["bench_model", "bench_pose_vs_full"]}
REPORTS = ("bench_rope", "bench_attention", "bench_model", "bench_pose_vs_full")
DEVICE_TOOL_FILE = re.compile(r"^[A-Za-z0-9._-]+$")


def test_smoke_run_writes_every_report_and_marks_what_its_budget_left_out(tmp_path):
    results, out = tmp_path / "results", tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out)}
    run = subprocess.run(["bash", "benchmarks/run_all.sh", "--smoke", "--budget", "1", "--output", str(results)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines[0].startswith("device:") and re.match(r"versions: python \S+, torch \S+, triton \S+", lines[2])

    for stage, steps in STAGES.items():  # every step ran, in order, and its time is on record
        table = (results / f"run_all_stage{stage}.md").read_text()
        rows = re.findall(r"^\| (\w+) \| (\d+) \| (\d+) \| (.+) \|$", table, re.M)
        assert [row[0] for row in rows] == steps and all(row[3] == "ok" for row in rows), table

    # the GPU tests: both kernel families (and the attention's left-padded keys) picked by their marker, nothing
    # CPU-only; here all skipped (no GPU)
    pytest_log = (results / "logs" / "pytest_gpu.log").read_text()
    skips = re.findall(r"^SKIPPED \[(\d+)\] (tests/\w+\.py):\d+: (.*)$", pytest_log, re.M)
    assert {name for _, name, _ in skips} == {"tests/test_rope.py", "tests/test_rope_attention.py",
                                              "tests/test_attention_cached_keys.py"}, pytest_log
    assert all(reason.startswith("needs a GPU") for *_, reason in skips)
    total = re.search(r"(\d+) skipped, \d+ deselected", pytest_log)
    assert total and int(total[1]) == sum(int(count) for count, _, _ in skips) >= 80

    for name in REPORTS:  # the whole plan in every report: its first row measured, the rest marked not run
        data = json.loads((results / f"{name}.json").read_text())
        first, *rest = data["results"]
        assert data["device"]["name"] and data["status"]["finished"], name
        assert first["skipped"] is None and first["metrics"]["ms_p50"] > 0, (name, first)
        assert rest and all(r["skipped"] == "not run: --time-budget 0 s spent" for r in rest), name
        assert (results / f"{name}.md").read_text().count("| not run: --time-budget 0 s spent |") == len(rest)
        assert (results / f"{name}.png").exists()
    assert json.loads((results / "env.json").read_text())["backends"]["rope"]["triton"]["usable"]

    # what the device tool brings back from $OUT: at most 8 plainly named files, the log and the results archive
    brought = sorted(p.name for p in out.iterdir())
    assert brought == ["results-stages.tar.gz", "stages.log"] and all(DEVICE_TOOL_FILE.match(n) for n in brought)
    assert (out / "stages.log").read_text() == run.stdout
    with tarfile.open(out / "results-stages.tar.gz") as archive:
        packed = set(archive.getnames())
    assert {f"results/{name}.json" for name in REPORTS} | {"results/run_all_stage2.md"} <= packed


GUARDED = """
import pytest

@pytest.mark.gpu
def test_marked():
    pass

def test_unmarked_gpu_test():
    pytest.skip("needs a GPU with the cuda backend")

def test_other_skip():
    pytest.skip("gguf is not installed")
"""


def test_conftest_keeps_the_gpu_marker_honest(tmp_path):
    """tests/conftest.py: without a GPU a `gpu` test skips, and an unmarked test that skips for want of a GPU fails (the
    GPU run would never select it); with CTXEXT_REQUIRE_GPU=1 (run_all.sh's GPU stage) a `gpu` test that skips fails
    too (an error: the skip happens in its set-up)."""
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_guarded.py").write_text(GUARDED)

    def outcomes(require_gpu: str) -> str:
        env = {**os.environ, "CTXEXT_REQUIRE_GPU": require_gpu}
        run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "test_guarded.py"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        return run.stdout

    cpu = outcomes("0")
    assert "SKIPPED [1] test_guarded.py:4: needs a GPU (torch sees no CUDA device)" in cpu, cpu
    assert "FAILED test_guarded.py::test_unmarked_gpu_test" in cpu
    assert ("skipped for want of a GPU (needs a GPU with the cuda backend) but not marked `gpu`: the GPU run "
            "(`pytest -m gpu`, benchmarks/run_all.sh) would never select it") in cpu
    assert "SKIPPED [1] test_guarded.py:12: gguf is not installed" in cpu
    gpu_run = outcomes("1")
    assert "ERROR test_guarded.py::test_marked" in gpu_run
    assert "a GPU test skipped on the GPU run (CTXEXT_REQUIRE_GPU=1): needs a GPU (torch sees no CUDA device)" in gpu_run
