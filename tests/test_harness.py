"""The benchmark harness on CPU: quantiles, derived metrics, skipped providers, device description, the report that
is rewritten after every row, and the benchmark scripts' own logic (break-even table, RoPE-off wiring)."""

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

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


def test_max_ms_caps_the_timed_loop_of_slow_calls():
    calls = []

    def slow():
        calls.append(None)
        time.sleep(0.01)

    harness.time_ms(slow, repeats=50, warmup=1, device="cpu", max_ms=35.0)
    # 1 warm-up + 1 probe + max(3, 35 ms // ~10 ms) timed calls, never the 50 asked for
    assert 2 + harness.MIN_REPEATS <= len(calls) <= 2 + 4
    calls.clear()
    harness.time_ms(slow, repeats=2, warmup=0, device="cpu", max_ms=1.0)
    assert len(calls) == 1 + 2  # fewer repeats than MIN_REPEATS asked for: kept


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


def test_smollm2_shape_is_the_bundled_models():
    """The random stand-in for SmolLM2-135M on a GPU machine has the real model's shape: its GGUF's metadata."""
    gguf = pytest.importorskip("gguf")
    import bench_pose_vs_full

    reader = gguf.GGUFReader(bench_pose_vs_full.smollm2_path())
    meta = {key: field.contents() for key, field in reader.fields.items() if key.startswith("llama.")}
    shape = harness.SMOLLM2_135M
    assert (meta["llama.embedding_length"], meta["llama.feed_forward_length"], meta["llama.block_count"],
            meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"],
            meta["llama.rope.dimension_count"], meta["llama.vocab_size"], meta["llama.context_length"]) == (
        shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["num_attention_heads"],
        shape["num_key_value_heads"], shape["head_dim"], shape["vocab_size"], shape["max_position_embeddings"])
    assert meta["llama.rope.freq_base"] == shape["rope_theta"]
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(shape["rms_norm_eps"])
    assert "output.weight" not in {t.name for t in reader.tensors} and shape["tie_word_embeddings"]
    model = harness.random_llama(shape, layers=1, device="meta")  # the config transformers builds from it
    layer = 3 * 576 * 1536 + 576 * 64 * (9 + 3 + 3 + 9) + 2 * 576  # MLP, q/k/v/o projections, two norms
    assert sum(p.numel() for p in model.parameters()) == 576 * 49152 + layer + 576  # tied: one vocab matrix


def test_parser_has_the_common_flags():
    args = harness.parser("demo").parse_args(["--smoke", "--output", "x", "--repeats", "3", "--time-budget", "9"])
    assert args.smoke and not args.quick and args.output == Path("x") and args.repeats == 3 and args.time_budget == 9
    assert not harness.Deadline(None).expired() and not harness.Deadline(3600).expired()
    assert harness.Deadline(-1).expired() and "--time-budget -1 s" in harness.Deadline(-1).reason()
    # the budget counts from the process start: this test process has been running for a while already
    assert harness.Deadline(0).elapsed() >= harness.process_age() > 0
    assert harness.report_name("bench_rope", harness.parser("d").parse_args(["--quick"])) == "bench_rope_quick"
    assert harness.report_name("bench_rope", harness.parser("d").parse_args(["--quick", "--smoke"])) == "bench_rope"


def _table_rows(path: Path, header: str) -> list[str]:
    table = path.read_text().splitlines()
    return table[table.index(header) + 2:]


def test_report_is_rewritten_after_every_row_and_marks_the_rest_not_run(tmp_path):
    planned = [({"tokens": n, "mode": mode}, p) for n in (4, 2, 1) for mode in ("fwd", "bwd") for p in ("a", "b")]
    report = harness.Report("demo", {"k": 1}, tmp_path, planned, device="cpu", x="tokens", y="gbps",
                            panels=("mode",), columns=("gbps", "pct_of_a"),
                            derive=lambda rows: harness.add_relative(rows, "a", "gbps", ("tokens", "mode"),
                                                                     name="pct_of_a"),
                            appendix=lambda rows: f"{len(rows)} rows\n")
    header = "| tokens | mode | provider | gbps | pct_of_a |"
    rows = _table_rows(tmp_path / "demo.md", header)  # written at once: the whole plan, nothing measured yet
    assert len(rows) == 14 and all("not run: not reached" in row for row in rows[:12]) and rows[-1] == "12 rows"
    for case, provider in planned[:5]:
        report.add(harness.measure("t", provider, case, lambda: None, repeats=3, bytes_moved=case["tokens"],
                                   device="cpu"))
    report.add(harness.skipped("t", "c", {"tokens": 1, "mode": "fwd"}, "not installed | really"))  # not planned
    data = json.loads((tmp_path / "demo.json").read_text())  # what a kill now would leave
    assert data["device"]["slug"] and data["settings"] == {"k": 1} and not data["status"]["finished"]
    assert (data["status"]["measured"], data["status"]["not_run"], data["status"]["skipped"]) == (5, 7, 1)
    assert [(r["case"], r["provider"]) for r in data["results"][:12]] == planned  # plan order, extras after
    assert data["results"][0]["metrics"]["pct_of_a"] == pytest.approx(100.0)
    assert not (tmp_path / "demo.png").exists()
    assert not report.expired()

    report.finish()
    data = json.loads((tmp_path / "demo.json").read_text())
    assert data["status"]["finished"] and [r["skipped"] for r in data["results"][5:12]] == ["not run"] * 7
    rows = _table_rows(tmp_path / "demo.md", header)
    assert len(rows) == 15 and rows[-2:] == ["", "13 rows"]  # 13 table rows, a blank line, the appendix
    assert all(row.count("|") == 6 for row in rows[:13])  # a '|' in a reason must not add a cell
    assert "| 1 | fwd | c | skipped: not installed / really | - |" in rows
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic writes leave no scratch files


def test_report_time_budget_lets_the_first_row_run(tmp_path):
    planned = [({"n": n}, "p") for n in (4, 2, 1)]
    report = harness.Report("demo", {}, tmp_path, planned, time_budget=0, device="cpu", x="n", y="ms_p50",
                            plots=(("_again", "ms_p50"),))
    assert not report.expired()  # spent, but no row yet: every report carries at least one number
    report.add(harness.measure("t", "p", {"n": 4}, lambda: None, repeats=1, device="cpu"))
    assert report.expired()
    report.finish()
    data = json.loads((tmp_path / "demo.json").read_text())
    assert [r["skipped"] for r in data["results"]] == [None] + ["not run: --time-budget 0 s spent"] * 2
    assert (tmp_path / "demo.png").exists() and (tmp_path / "demo_again.png").exists()


def test_bench_rope_smoke_runs_every_cpu_provider_and_checks_accuracy(tmp_path):
    import bench_rope

    bench_rope.main(["--smoke", "--repeats", "2", "--output", str(tmp_path)])
    data = json.loads((tmp_path / "bench_rope.json").read_text())
    rows = {(r["provider"], r["case"]["tokens"], r["case"]["kv_heads"], r["case"]["mode"]): r for r in data["results"]}
    for provider in ("ctxext-cpu", "ctxext-cpu-nocheck", "ctxext-cpu-raw", "ctxext-torch", "hf-eager", "hf-apply"):
        row = rows[(provider, 256, 4, "fwd")]
        assert row["skipped"] is None and row["metrics"]["gbps"] > 0, provider
        # fp32 rotation by angles up to 255 rad: our exact angles stay at fp32 rounding of the outputs
        limit = 1e-5 if provider.startswith("ctxext") else 1e-3
        assert row["metrics"]["max_err"] < limit, (provider, row["metrics"]["max_err"])
    assert rows[("copy", 256, 4, "fwd")]["metrics"]["pct_of_copy"] == pytest.approx(100.0)
    assert "wall_ms_p50" in rows[("ctxext-cpu", 1, 1, "fwd")]["metrics"]  # decode: host overhead is reported
    assert ("ctxext-cpu-raw", 256, 4, "fwd+bwd") not in rows  # the bare launcher has no backward
    assert (tmp_path / "bench_rope.png").exists() and (tmp_path / "bench_rope.md").exists()


def test_bench_rope_past_its_time_budget_measures_the_largest_row_only(tmp_path):
    import bench_rope

    bench_rope.main(["--smoke", "--time-budget", "-1", "--output", str(tmp_path)])
    data = json.loads((tmp_path / "bench_rope.json").read_text())
    first, *rest = data["results"]
    assert first["case"] == {"tokens": 256, "kv_heads": 4, "mode": "fwd"} and first["metrics"]["gbps"] > 0
    assert rest and all(r["skipped"] == "not run: --time-budget -1 s spent" for r in rest)
    assert rest[-1]["case"]["tokens"] == 1  # the decode token comes last


def test_bench_rope_records_a_failing_peer_as_skipped(tmp_path, monkeypatch):
    import bench_rope

    def broken_peer(x):
        def run():
            raise RuntimeError("triton compile error\ntraceback lines")
        return run

    def missing_peer(x):
        raise ImportError("No module named 'liger_kernel'")

    only = {"copy": bench_rope._copy, "broken": broken_peer, "missing": missing_peer}
    monkeypatch.setattr(bench_rope, "providers", lambda device, full: dict(only))
    bench_rope.main(["--smoke", "--repeats", "1", "--output", str(tmp_path)])
    rows = json.loads((tmp_path / "bench_rope.json").read_text())["results"]
    reasons = {r["provider"]: r["skipped"] for r in rows if r["case"] == {"tokens": 256, "kv_heads": 4, "mode": "fwd"}}
    assert reasons == {"copy": None, "broken": "RuntimeError: triton compile error",
                       "missing": "ImportError: No module named 'liger_kernel'"}


def _rows(times: dict) -> list:
    return [harness.Result("attention", provider, {"seq": seq, "kv_heads": 8, "mode": "fwd"}, {"ms_p50": ms})
            for (provider, seq), ms in times.items()]


def test_break_even_table():
    import bench_attention

    base = bench_attention.BASELINE
    rows = _rows({("fused-cuda", 1024): 2.0, (base, 1024): 1.0, ("fused-cuda-norope", 1024): 1.6,
                  ("fused-cuda", 4096): 4.0, (base, 4096): 5.0, ("fused-cuda-norope", 4096): 3.2,
                  ("fused-cuda", 16384): 9.0, (base, 16384): 10.0,
                  ("fused-triton", 1024): 1.0, (base + "x", 1024): 1.0})
    rows.append(harness.skipped("attention", "fused-cuda", {"seq": 65536, "kv_heads": 8, "mode": "fwd"}, "not run"))
    lines = bench_attention.break_even(rows).splitlines()
    assert "| fused | kv_heads | mode | 1024 | 4096 | 16384 | 65536 | fused faster from |" in lines
    # baseline / fused, and fused / norope - 1 where the RoPE-off twin ran; faster from 4096 on
    assert "| fused-cuda | 8 | fwd | 0.50x (+25%) | 1.25x (+25%) | 1.11x | - | 4096 |" in lines
    rows = _rows({("fused-triton", 1024): 1.0, (base, 1024): 2.0, ("fused-triton", 4096): 3.0, (base, 4096): 2.0})
    assert "| fused-triton | 8 | fwd | 2.00x | 0.67x | never |" in bench_attention.break_even(rows)


def test_bench_attention_rope_off_path_is_attention_without_rotation():
    """`fused_norope` (the launchers with rotate=False) in Triton's interpreter equals SDPA on the unrotated q, k:
    forward and gradients. The GPU benchmark times exactly this callable."""
    import bench_attention

    import ctxext_kernels as ck

    if not ck.backends("cpu")["triton"][0]:
        pytest.skip(ck.backends("cpu")["triton"][1])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, 16, 32, generator=g) for heads in (2, 1, 1))
    pos = torch.arange(16).expand(1, 16)
    spec = ck.RopeSpec.from_params(32, 10000.0)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    want = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
    grad = torch.randn(want.shape, generator=g)
    want.backward(grad)
    got = bench_attention.fused_norope("triton")(q, k, v, pos, spec)()
    torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-4)
    grads = bench_attention.fused_norope("triton")(q, k, v, pos, spec, grad)()
    for name, got, leaf in zip(("dq", "dk", "dv"), grads, leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_config_override_applies_inside_its_block_only():
    from ctxext_kernels.ops import triton_configs
    from ctxext_kernels.ops.triton_configs import Config

    table = triton_configs.attention_config("dq", 128, torch.bfloat16, (9, 0))
    with triton_configs.override("dq", Config(16, 32, 4, 1)):
        assert triton_configs.attention_config("dq", 128, torch.bfloat16, (9, 0)) == Config(16, 32, 4, 1)
        assert triton_configs.attention_config("fwd", 128, torch.bfloat16, None) == triton_configs.INTERPRETER
        with triton_configs.override("dq", Config(32, 16, 4, 1)):
            assert triton_configs.attention_config("dq", 64, torch.float16, None) == Config(32, 16, 4, 1)
        assert triton_configs.attention_config("dq", 128, torch.bfloat16, (9, 0)) == Config(16, 32, 4, 1)
    assert triton_configs.attention_config("dq", 128, torch.bfloat16, (9, 0)) == table
    with pytest.raises(ValueError, match="kernel must be"):
        with triton_configs.override("bwd", table):
            pass


def _tune_rows(path: Path) -> dict:
    report = json.loads((path / "tune_attention_smoke.json").read_text())
    return {(r["case"]["kernel"], r["provider"]): r for r in report["results"]}


def test_tune_attention_smoke_times_every_candidate_against_the_table(tmp_path):
    """tune_attention --smoke (the interpreter, tiny tiles): every candidate of every kernel is compared with the table
    configuration's outputs and timed, then fwd+bwd with the fastest; no override outlives the run."""
    import tune_attention

    from ctxext_kernels.ops import triton_configs

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (tests/conftest.py sets it without a GPU)")
    tune_attention.main(["--smoke", "--output", str(tmp_path)])
    rows = _tune_rows(tmp_path)
    for kernel, candidates in tune_attention.SMOKE_CANDIDATES.items():
        for candidate in candidates:
            row = rows[(kernel, tune_attention.label(triton_configs.Config(*candidate)))]
            assert not row["skipped"], row
            assert row["metrics"]["max_diff"] <= tune_attention.TOLERANCE and row["metrics"]["ms_p50"] > 0
        # the interpreter's table configuration is the first smoke candidate: its row is the reference, speed-up 1
        assert rows[(kernel, "16x16 w4 s1")]["metrics"]["speedup_vs_table"] == 1.0
    assert all(not rows[("fwd+bwd", name)]["skipped"] for name in ("table", "tuned", "ropeop+sdpa-flash"))
    assert not triton_configs._OVERRIDES


def test_tune_attention_skips_a_candidate_whose_outputs_differ(tmp_path, monkeypatch):
    import tune_attention

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (tests/conftest.py sets it without a GPU)")
    monkeypatch.setattr(tune_attention, "SMOKE_CANDIDATES",
                        {kernel: [(32, 16, 4, 1)] for kernel in tune_attention.KERNELS})
    monkeypatch.setattr(tune_attention, "max_diff", lambda got, want: 0.5)  # as a wrong tile boundary would give
    tune_attention.main(["--smoke", "--repeats", "1", "--output", str(tmp_path)])
    rows = _tune_rows(tmp_path)
    for kernel in tune_attention.KERNELS:
        assert "outputs differ from the table configuration's by 0.5" in rows[(kernel, "32x16 w4 s1")]["skipped"]
    assert not rows[("fwd+bwd", "tuned")]["skipped"]  # nothing faster was found: the table's configurations
