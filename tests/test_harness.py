"""The benchmark harness on CPU: quantiles, derived metrics, skipped providers, device description, the three writers."""

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness  # noqa: E402


def test_quantiles_interpolate_between_order_statistics():
    # 0..10 ms: p20 = 2, p50 = 5, p80 = 8 exactly, whatever order the samples came in
    assert harness._quantiles([7.0, 0.0, 10.0, 3.0, 5.0, 1.0, 9.0, 2.0, 8.0, 4.0, 6.0]) == {
        "ms_p20": 2.0, "ms_p50": 5.0, "ms_p80": 8.0}
    assert harness._quantiles([4.0], prefix="wall_ms") == {"wall_ms_p20": 4.0, "wall_ms_p50": 4.0, "wall_ms_p80": 4.0}


def test_cpu_timer_sees_a_known_delay():
    timing = harness.time_ms(lambda: time.sleep(0.002), repeats=5, warmup=1, device="cpu")
    assert 2.0 <= timing["ms_p20"] <= timing["ms_p50"] <= timing["ms_p80"] < 200.0
    wall = harness.wall_ms(lambda: time.sleep(0.001), repeats=3, calls=3, device="cpu")
    assert 1.0 <= wall["wall_ms_p20"] <= wall["wall_ms_p50"] <= wall["wall_ms_p80"]
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        harness.time_ms(lambda: None, repeats=0, device="cpu")


def test_measure_derives_rates_from_the_median():
    result = harness.measure("t", "sum", {"tokens": 8}, lambda: sum(range(1000)), repeats=20, bytes_moved=10**6,
                             flops=10**9, memory=True, device="cpu")
    m = result.metrics
    assert 0 < m["ms_p20"] <= m["ms_p50"] <= m["ms_p80"]
    assert m["gbps"] == pytest.approx(10**6 / (m["ms_p50"] / 1e3) / 1e9)
    assert m["tflops"] == pytest.approx(10**9 / (m["ms_p50"] / 1e3) / 1e12)
    assert m["peak_mib"] is None  # no honest CPU number: reported as missing, not as zero
    assert harness.gbps(2e9, 1000.0) == pytest.approx(2.0) and harness.tflops(3e12, 500.0) == pytest.approx(6.0)


def test_failing_provider_is_recorded_not_raised():
    def out_of_memory():
        raise RuntimeError("CUDA out of memory. Tried to allocate 80 GiB\nmore detail")

    result = harness.measure("t", "big", {"tokens": 8}, out_of_memory, device="cpu")
    assert result.skipped == "RuntimeError: CUDA out of memory. Tried to allocate 80 GiB" and not result.metrics


def test_device_description_and_bandwidth_table():
    info = harness.device_info("cpu")
    assert info["slug"] == harness.slugify(info["name"]) and info["torch"] and info["peak_gbps"] is None
    assert harness.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert harness.peak_bandwidth_gbps("NVIDIA H100 80GB HBM3") == 3350.0
    assert harness.peak_bandwidth_gbps("NVIDIA H100 PCIe") == 2000.0
    assert harness.peak_bandwidth_gbps("NVIDIA H200") == 4800.0
    assert harness.peak_bandwidth_gbps("Some Future GPU") is None


def test_parser_has_the_common_flags():
    args = harness.parser("demo").parse_args(["--smoke", "--output", "x", "--repeats", "3", "--time-budget", "9"])
    assert args.smoke and not args.quick and args.output == Path("x") and args.repeats == 3 and args.time_budget == 9
    assert not harness.Deadline(None).expired() and not harness.Deadline(60).expired()
    assert harness.Deadline(-1).expired() and "--time-budget -1 s" in harness.Deadline(-1).reason()


def test_writers(tmp_path):
    results = [harness.measure("t", p, {"tokens": n, "mode": mode}, lambda: None, repeats=3, bytes_moved=n,
                               device="cpu")
               for p in ("a", "b") for n in (1, 2, 4) for mode in ("fwd", "bwd")]
    results.append(harness.skipped("t", "c", {"tokens": 1, "mode": "fwd"}, "not installed | really"))
    harness.add_relative(results, "a", "gbps", ("tokens", "mode"), name="pct_of_a")
    out = harness.write_report("demo", results, {"k": 1}, tmp_path, x="tokens", y="gbps", panels=("mode",),
                               columns=("gbps", "pct_of_a"), device="cpu")
    data = json.loads((out / "demo.json").read_text())
    assert data["device"]["slug"] and data["settings"] == {"k": 1} and len(data["results"]) == 13
    assert all(r["metrics"]["pct_of_a"] == pytest.approx(100.0) for r in data["results"] if r["provider"] == "a")
    table = (out / "demo.md").read_text().splitlines()
    header = table.index("| tokens | mode | provider | gbps | pct_of_a |")
    rows = table[header + 2:]
    assert len(rows) == 13 and all(row.count("|") == 6 for row in rows)  # a '|' in a reason must not add a cell
    assert "| 1 | fwd | c | skipped: not installed / really | - |" in rows
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rope_smoke_runs_every_cpu_provider_and_checks_accuracy(tmp_path):
    import bench_rope

    bench_rope.main(["--smoke", "--repeats", "2", "--output", str(tmp_path)])
    data = json.loads((tmp_path / "bench_rope.json").read_text())
    rows = {(r["provider"], r["case"]["tokens"], r["case"]["kv_heads"], r["case"]["mode"]): r for r in data["results"]}
    for provider in ("ctxext-cpu", "ctxext-cpu-raw", "ctxext-torch", "hf-eager", "hf-apply"):
        row = rows[(provider, 256, 4, "fwd")]
        assert row["skipped"] is None and row["metrics"]["gbps"] > 0, provider
        # fp32 rotation by angles up to 255 rad: our exact angles stay at fp32 rounding of the outputs
        limit = 1e-5 if provider.startswith("ctxext") else 1e-3
        assert row["metrics"]["max_err"] < limit, (provider, row["metrics"]["max_err"])
    assert rows[("copy", 256, 4, "fwd")]["metrics"]["pct_of_copy"] == pytest.approx(100.0)
    assert "wall_ms_p50" in rows[("ctxext-cpu", 1, 1, "fwd")]["metrics"]  # decode: host overhead is reported
    assert ("ctxext-cpu-raw", 256, 4, "fwd+bwd") not in rows  # the bare launcher has no backward
    assert (tmp_path / "bench_rope.png").exists() and (tmp_path / "bench_rope.md").exists()


def test_bench_rope_past_its_time_budget_still_writes_a_report(tmp_path):
    import bench_rope

    bench_rope.main(["--smoke", "--time-budget", "-1", "--output", str(tmp_path)])
    data = json.loads((tmp_path / "bench_rope.json").read_text())
    assert data["results"] and all(r["skipped"].startswith("not run: --time-budget") for r in data["results"])


def test_bench_rope_records_a_failing_peer_as_skipped(tmp_path, monkeypatch):
    import bench_rope

    def broken_peer(x):
        def run():
            raise RuntimeError("triton compile error\ntraceback lines")
        return run

    def missing_peer(x):
        raise ImportError("No module named 'liger_kernel'")

    only = {"copy": bench_rope._copy, "broken": broken_peer, "missing": missing_peer}
    monkeypatch.setattr(bench_rope, "providers", lambda device, smoke: dict(only))
    bench_rope.main(["--smoke", "--repeats", "1", "--output", str(tmp_path)])
    rows = json.loads((tmp_path / "bench_rope.json").read_text())["results"]
    reasons = {r["provider"]: r["skipped"] for r in rows if r["case"] == {"tokens": 256, "kv_heads": 4, "mode": "fwd"}}
    assert reasons == {"copy": None, "broken": "RuntimeError: triton compile error",
                       "missing": "ImportError: No module named 'liger_kernel'"}
