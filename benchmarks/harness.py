"""The one benchmark harness: timing, peak memory, device description, results, and the JSON/markdown/PNG writers.

Every benchmark script builds a list of `Result`s with `measure(...)` and hands them to `write_report(...)`; all share
`parser(...)`'s flags (`--smoke`, `--output`, `--repeats`). On a GPU, time comes from `triton.testing.do_bench`
(L2 flushed before every repeat, quantiles p20/p50/p80); on a CPU from `time.perf_counter` with the same quantiles, so
every script also runs in a seconds-long `--smoke` mode where there is no GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

QUANTILES = (0.2, 0.5, 0.8)
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass
class Result:
    """One measurement: `case` holds the shape parameters (e.g. tokens, kv_heads), `metrics` the numbers (ms_p50,
    gbps, ...); `skipped` says why a provider could not run that case."""

    benchmark: str
    provider: str
    case: dict
    metrics: dict = dataclasses.field(default_factory=dict)
    skipped: str | None = None


def device_info() -> dict:
    """Name, slug (a folder name for results), and the versions a reader needs to reproduce a figure."""
    import triton

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        name = props.name
        extra = {"sm": f"{props.major}{props.minor}", "memory_gib": round(props.total_memory / 2**30, 1),
                 "cuda": torch.version.cuda}
    else:
        name = f"cpu-{platform.machine()}"
        extra = {"cpu_count": torch.get_num_threads()}
    return {"name": name, "slug": re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"), "torch": torch.__version__,
            "triton": triton.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), **extra}


def time_ms(fn: Callable[[], object], repeats: int = 50, warmup: int = 5) -> dict[str, float]:
    """Quantiles of one call's time in milliseconds: `{"ms_p20", "ms_p50", "ms_p80"}`."""
    if torch.cuda.is_available():
        import triton.testing

        # do_bench flushes L2 before each repeat, so a kernel never reads its inputs from a warm cache
        values = triton.testing.do_bench(fn, warmup=warmup * 5, rep=repeats * 2, quantiles=list(QUANTILES))
    else:
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        cuts = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
        values = [cuts[1], statistics.median(samples), cuts[7]]
    return {f"ms_p{int(q * 100)}": float(v) for q, v in zip(QUANTILES, values)}


def peak_memory_mib(fn: Callable[[], object]) -> float | None:
    """Peak GPU memory allocated while `fn` runs (MiB), measured from a reset; None on CPU (not measured)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def measure(benchmark: str, provider: str, case: dict, fn: Callable[[], object], *, repeats: int = 50,
            bytes_moved: int | None = None, flops: float | None = None, memory: bool = False) -> Result:
    """Time `fn` (and optionally its peak memory); derive GB/s and TFLOP/s from the median when sizes are given.
    A provider that fails (unsupported shape, out of memory) is recorded as skipped with the reason, never raised."""
    try:
        metrics = time_ms(fn, repeats)
        if memory:
            metrics["peak_mib"] = peak_memory_mib(fn)
    except (RuntimeError, ValueError, NotImplementedError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return Result(benchmark, provider, case, skipped=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    seconds = metrics["ms_p50"] / 1e3
    if bytes_moved is not None:
        metrics["gbps"] = bytes_moved / seconds / 1e9
    if flops is not None:
        metrics["tflops"] = flops / seconds / 1e12
    return Result(benchmark, provider, case, metrics)


def skipped(benchmark: str, provider: str, case: dict, reason: str) -> Result:
    return Result(benchmark, provider, case, skipped=reason)


def add_relative(results: list[Result], reference_provider: str, metric: str, key: tuple[str, ...],
                 name: str = "pct_of_ref") -> None:
    """Add `name` = 100 * metric / metric of `reference_provider` for the same case (e.g. % of the copy ceiling)."""
    reference = {tuple(r.case[k] for k in key): r.metrics.get(metric) for r in results
                 if r.provider == reference_provider and not r.skipped}
    for r in results:
        ref = reference.get(tuple(r.case[k] for k in key))
        if ref and metric in r.metrics:
            r.metrics[name] = 100.0 * r.metrics[metric] / ref


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark script has."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, CPU-friendly: checks the script runs")
    p.add_argument("--quick", action="store_true", help="fewer shapes (fits a 10-minute GPU lease command)")
    p.add_argument("--output", type=Path, default=None,
                   help="results folder (default: benchmarks/results/<device-slug>/)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    return p


def write_report(name: str, results: list[Result], settings: dict, output: Path | None, *, x: str, y: str,
                 series: tuple[str, ...] = (), columns: tuple[str, ...] = (), log_x: bool = True) -> Path:
    """Write `<name>.json` (device + settings + results), `<name>.md` (a table) and `<name>.png` (y against x, one
    line per provider and `series` combination) into `output`; return the folder."""
    device = device_info()
    output = Path(output) if output else RESULTS_DIR / device["slug"]
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{name}.json").write_text(json.dumps(
        {"benchmark": name, "device": device, "settings": settings,
         "results": [dataclasses.asdict(r) for r in results]}, indent=1))
    (output / f"{name}.md").write_text(_markdown(name, device, settings, results, columns or (y,)))
    _plot(output / f"{name}.png", name, device, results, x, y, series, log_x)
    return output


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _markdown(name, device, settings, results, columns) -> str:
    case_keys = list(dict.fromkeys(k for r in results for k in r.case))
    lines = [f"# {name} on {device['name']}", "", f"torch {device['torch']}, triton {device['triton']}, "
             f"{device['date'][:10]}. Settings: {json.dumps(settings)}", "",
             "| " + " | ".join(case_keys + ["provider"] + list(columns)) + " |",
             "|" + "---|" * (len(case_keys) + 1 + len(columns))]
    for r in results:
        cells = [_fmt(r.case.get(k)) for k in case_keys] + [r.provider]
        cells += [f"skipped: {r.skipped}" if r.skipped else _fmt(r.metrics.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(path: Path, name, device, results, x, y, series, log_x) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        if r.skipped or r.metrics.get(y) is None or x not in r.case:
            continue
        label = " ".join([r.provider] + [f"{k}={r.case[k]}" for k in series])
        lines.setdefault(label, []).append((r.case[x], r.metrics[y]))
    for label, points in sorted(lines.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"{name} — {device['name']}")
    ax.grid(True, alpha=0.3)
    if lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
