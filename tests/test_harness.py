"""The benchmark harness on CPU: quantile order, derived metrics, skipped providers, and the three writers."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness  # noqa: E402


def test_measure_orders_quantiles_and_derives_rates():
    result = harness.measure("t", "sleepless", {"tokens": 8}, lambda: sum(range(1000)), repeats=20, bytes_moved=10**6,
                             flops=10**9)
    m = result.metrics
    assert 0 < m["ms_p20"] <= m["ms_p50"] <= m["ms_p80"]
    assert abs(m["gbps"] - 10**6 / (m["ms_p50"] / 1e3) / 1e9) < 1e-9
    assert abs(m["tflops"] - 10**9 / (m["ms_p50"] / 1e3) / 1e12) < 1e-12


def test_failing_provider_is_recorded_not_raised():
    def boom():
        raise RuntimeError("CUDA out of memory. Tried to allocate 80 GiB")

    result = harness.measure("t", "big", {"tokens": 8}, boom)
    assert result.skipped.startswith("RuntimeError: CUDA out of memory")


def test_writers(tmp_path):
    results = [harness.measure("t", p, {"tokens": n}, lambda: None, repeats=3, bytes_moved=n) for p in ("a", "b")
               for n in (1, 2, 4)]
    results.append(harness.skipped("t", "c", {"tokens": 1}, "not installed"))
    harness.add_relative(results, "a", "gbps", ("tokens",), name="pct_of_a")
    out = harness.write_report("demo", results, {"k": 1}, tmp_path, x="tokens", y="gbps", columns=("gbps", "pct_of_a"))
    data = json.loads((out / "demo.json").read_text())
    assert data["device"]["slug"] and len(data["results"]) == 7
    assert all(abs(r["metrics"]["pct_of_a"] - 100.0) < 1e-9 for r in data["results"] if r["provider"] == "a")
    table = (out / "demo.md").read_text()
    assert "| tokens | provider | gbps | pct_of_a |" in table and "skipped: not installed" in table
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"
