"""The one benchmark harness: timing, peak memory, device description, results, and the JSON/markdown/PNG writers.

Every benchmark script declares the rows it plans to measure (case x provider) in a `Report`, measures them with
`measure(...)` (largest case first where that is what matters) and `add`s each `Result`: the report (JSON + markdown)
is rewritten after every row, rows not measured yet read "not run", and `finish()` adds the PNG. A run cut short by
`--time-budget`, or killed, still leaves a complete table. All scripts share `parser(...)`'s flags (`--smoke`,
`--quick`, `--output`, `--repeats`, `--time-budget`), so they have the same `--help`.

Timing
------
- GPU (`device="cuda"`): CUDA events around each call, with L2 flushed before every call (a 256 MiB memset, more than
  any current L2) so a kernel never reads its inputs from a warm cache; quantiles p20/p50/p80 over exactly `repeats`
  calls, after `warmup` untimed calls (compilation, autotuning, allocator warm-up stay out). This is what
  `triton.testing.do_bench` does, but with a fixed repeat count instead of a time budget. `max_ms` caps the timed loop
  of slow calls (never fewer than 3 calls), so one 64k-token attention case cannot eat a GPU session's budget. The
  events measure *device* time: the host overhead of a call hides behind the flush, so `measure(..., wall=True)` also
  reports the per-call wall-clock time of back-to-back calls (`wall_ms_*`), which is what a caller that launches one
  call after another (decode) sees and where Python overhead shows.
- CPU (`device="cpu"`): `time.perf_counter` around each call, same warm-up and quantiles, so every script has a
  seconds-long `--smoke` mode on a machine without a GPU.

Derived metrics: `gbps(bytes, ms)` (achieved bandwidth, bytes read + written once each), `tflops(flops, ms)`,
`add_relative(...)` (% of a reference provider such as a `copy_` of the same bytes) and `pct_of_peak` (% of the
datasheet bandwidth, where `device_info()` knows it).

Models: `random_llama(...)` builds the random-initialised LLaMA stacks the model-level scripts time, e.g. with
`SMOLLM2_135M`'s shape (the bundled GGUF is 94 MB and cannot travel to a lent GPU machine; speed and memory depend on
the shape, not on the weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform
import re
import time
from pathlib import Path
from typing import Callable

import torch

QUANTILES = (0.2, 0.5, 0.8)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Larger than the L2 of every current NVIDIA GPU (H100 50 MB, H200 60 MB, B200 126 MB): zeroing it evicts all inputs.
L2_FLUSH_BYTES = 256 * 2**20
# Datasheet DRAM bandwidth in GB/s, matched against torch's device name (first match wins, so specific names first).
PEAK_GBPS = (
    ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("H200", 4800.0), ("GH200", 4000.0),
    ("B200", 8000.0), ("A100 80GB PCIe", 1935.0), ("A100-SXM4-80GB", 2039.0), ("A100", 1555.0),
    ("L40S", 864.0), ("L4", 300.0), ("RTX 4090", 1008.0), ("A10G", 600.0),
)
MIN_REPEATS = 3  # the fewest timed calls behind a quantile, whatever `max_ms` allows
# SmolLM2-135M's shape, read from the bundled GGUF's metadata (llama.* keys; no output tensor: tied embeddings)
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, rope_theta=100000.0,
                    max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True)
# LLaMA-3-8B's layer shape (stack as few layers as the GPU's memory and the time allow)
LLAMA3_8B_LAYER = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, vocab_size=32000, rope_theta=500000.0)
# a 2-layer toy for --smoke: seconds on a CPU
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512)


@dataclasses.dataclass
class Result:
    """One measurement.

    Attributes
    ----------
    benchmark : str
        The script's name, e.g. "rope".
    provider : str
        The implementation measured, e.g. "ctxext-cuda", "hf-eager", "copy".
    case : dict
        The shape parameters (e.g. tokens, kv_heads, mode); `write_report` uses them as table columns and plot axes.
    metrics : dict
        Numbers: `ms_p20/ms_p50/ms_p80` always, plus `gbps`, `tflops`, `peak_mib`, `wall_ms_*`, `pct_of_*` when asked.
    skipped : str or None
        Why the provider did not run this case (not installed, out of memory, unsupported shape); metrics are empty.
    """

    benchmark: str
    provider: str
    case: dict
    metrics: dict = dataclasses.field(default_factory=dict)
    skipped: str | None = None


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slugify(name: str) -> str:
    """A folder name from a device name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def peak_bandwidth_gbps(device_name: str) -> float | None:
    """Datasheet DRAM bandwidth (GB/s) of a GPU named like torch names it, or None when unknown."""
    for key, value in PEAK_GBPS:
        if key in device_name:
            return value
    return None


def device_info(device: str | None = None) -> dict:
    """What a reader needs to reproduce a figure: device name, `slug` (the results folder), versions, bandwidth.

    Parameters
    ----------
    device : {"cuda", "cpu"} or None
        The device the benchmark ran on; None means CUDA when torch sees a GPU, else the CPU.

    The description (and its `date`, the run's start) is taken once per process and device: reports are rewritten
    after every row.
    """
    return dict(_device_info(device or _default_device()))


@functools.cache
def _device_info(device: str) -> dict:
    info = {"torch": torch.__version__, "triton": _version("triton"), "transformers": _version("transformers"),
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, sm=f"{props.major}{props.minor}", sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
                    peak_gbps=peak_bandwidth_gbps(props.name))
    else:
        info.update(name=_cpu_name(), threads=torch.get_num_threads(), peak_gbps=None)
    info["slug"] = slugify(info["name"])
    return info


def _quantiles(samples_ms: list[float], prefix: str = "ms") -> dict[str, float]:
    """p20/p50/p80 of `samples_ms` (linear interpolation between order statistics)."""
    ordered = sorted(samples_ms)

    def at(q: float) -> float:
        index = q * (len(ordered) - 1)
        low = int(index)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (index - low)

    return {f"{prefix}_p{round(q * 100)}": at(q) for q in QUANTILES}


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def time_ms(fn: Callable[[], object], repeats: int = 50, warmup: int = 5, *, device: str | None = None,
            flush_l2: bool = True, max_ms: float | None = None) -> dict[str, float]:
    """Quantiles of one call's time in milliseconds.

    Parameters
    ----------
    fn : callable
        The work, with its inputs bound (no arguments).
    repeats, warmup : int
        Timed calls and untimed calls before them.
    device : {"cuda", "cpu"} or None
        Where `fn` runs (None: CUDA when available). CUDA uses events (device time), CPU `time.perf_counter`.
    flush_l2 : bool
        CUDA only: zero `L2_FLUSH_BYTES` before every timed call.
    max_ms : float or None
        Cap on the timed loop: one probe call (timed after the warm-up) sets the repeats to
        `max(MIN_REPEATS, min(repeats, max_ms // probe))`. None: exactly `repeats`.

    Returns
    -------
    dict
        `{"ms_p20", "ms_p50", "ms_p80"}`.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = device or _default_device()
    for _ in range(warmup):
        fn()
    if max_ms is not None:
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        fn()
        sync()
        probe_ms = (time.perf_counter() - start) * 1e3
        repeats = max(min(repeats, MIN_REPEATS), min(repeats, math.floor(max_ms / max(probe_ms, 1e-6))))
    if device != "cuda":
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return _quantiles(samples)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda") if flush_l2 else None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    torch.cuda.synchronize()
    for start, end in zip(starts, ends):
        if flush is not None:
            flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return _quantiles([start.elapsed_time(end) for start, end in zip(starts, ends)])


def wall_ms(fn: Callable[[], object], repeats: int = 20, calls: int = 20, *, device: str | None = None
            ) -> dict[str, float]:
    """Per-call wall-clock time of `calls` back-to-back calls (host overhead included), quantiles over `repeats`.

    Returns `{"wall_ms_p20", "wall_ms_p50", "wall_ms_p80"}`. No L2 flush: this is the steady state a decode loop sees.
    """
    device = device or _default_device()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3 / calls)
    return _quantiles(samples, prefix="wall_ms")


def peak_memory_mib(fn: Callable[[], object], *, device: str | None = None) -> float | None:
    """Peak GPU memory allocated while `fn` runs (MiB), counted from a reset of the peak.

    On CPU this returns None: torch's CPU allocator bypasses Python's (tracemalloc would report ~0), so there is no
    honest number to give.
    """
    if (device or _default_device()) != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def gbps(bytes_moved: float, ms: float) -> float:
    """Achieved bandwidth in GB/s (1e9 bytes) of moving `bytes_moved` in `ms` milliseconds."""
    return bytes_moved / (ms * 1e-3) / 1e9


def tflops(flops: float, ms: float) -> float:
    """Achieved TFLOP/s (1e12) of `flops` floating-point operations in `ms` milliseconds."""
    return flops / (ms * 1e-3) / 1e12


def measure(benchmark: str, provider: str, case: dict, fn: Callable[[], object], *, repeats: int = 50,
            warmup: int = 5, bytes_moved: float | None = None, flops: float | None = None, memory: bool = False,
            wall: bool = False, device: str | None = None, max_ms: float | None = None) -> Result:
    """Time `fn` (`time_ms`, with `max_ms`); optionally its peak memory and back-to-back wall time; derive GB/s and
    TFLOP/s from the median.

    A provider that fails (out of memory, unsupported shape, a peer's compile error) is recorded as skipped with the
    exception's type and first line, never raised: the table shows the reason next to the other providers.
    """
    device = device or _default_device()
    try:
        metrics = time_ms(fn, repeats, warmup, device=device, max_ms=max_ms)
        if wall:
            metrics.update(wall_ms(fn, device=device))
        if memory:
            metrics["peak_mib"] = peak_memory_mib(fn, device=device)
    except Exception as exc:  # noqa: BLE001 - any failure of a provider becomes a recorded skip reason
        if device == "cuda":
            torch.cuda.empty_cache()
        return Result(benchmark, provider, case, skipped=failure(exc))
    if bytes_moved is not None:
        metrics["gbps"] = gbps(bytes_moved, metrics["ms_p50"])
        peak = peak_bandwidth_gbps(torch.cuda.get_device_name(0)) if device == "cuda" else None
        if peak:
            metrics["pct_of_peak"] = 100.0 * metrics["gbps"] / peak
    if flops is not None:
        metrics["tflops"] = tflops(flops, metrics["ms_p50"])
    return Result(benchmark, provider, case, metrics)


def failure(exc: BaseException) -> str:
    """A skip reason from an exception: its type and the first line of its message (at most 200 characters)."""
    first_line = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {first_line}".rstrip(": ")


def skipped(benchmark: str, provider: str, case: dict, reason: str) -> Result:
    """A provider that cannot run `case` (e.g. not installed), with the reason shown in the table."""
    return Result(benchmark, provider, case, skipped=reason)


def add_relative(results: list[Result], reference_provider: str, metric: str, key: tuple[str, ...],
                 name: str = "pct_of_ref") -> None:
    """Add `name` = 100 * metric / (metric of `reference_provider` in the case with the same `key` values).

    E.g. `add_relative(results, "copy", "gbps", ("tokens", "kv_heads"), "pct_of_copy")`: % of the copy ceiling.
    """
    reference = {tuple(r.case.get(k) for k in key): r.metrics.get(metric) for r in results
                 if r.provider == reference_provider and not r.skipped}
    for r in results:
        ref = reference.get(tuple(r.case.get(k) for k in key))
        if ref and r.metrics.get(metric) is not None:
            r.metrics[name] = 100.0 * r.metrics[metric] / ref


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark script has; scripts add their own to it."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on the CPU (seconds): checks the script and the writers run")
    p.add_argument("--quick", action="store_true", help="fewer shapes, to fit one 10-minute GPU command")
    p.add_argument("--output", type=Path, default=None,
                   help="results folder (default: benchmarks/results/<device-slug>/)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default: per script)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no new row after this many seconds from the script's start (imports included); the "
                        "first row always runs, the rows left are recorded as not run, and the report is written "
                        "either way (benchmarks/run_all.sh gives each script its share of a GPU command this way)")
    return p


def process_age() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere 0), so a time budget counts the imports too."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class Deadline:
    """`--time-budget` for a sweep: `expired()` once `seconds` have passed since the process started (never when
    None)."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.monotonic() - process_age()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def expired(self) -> bool:
        return self.seconds is not None and self.elapsed() > self.seconds

    def reason(self) -> str:
        return f"not run: --time-budget {self.seconds:g} s spent"


NOT_REACHED = "not run: not reached (the run stopped before this row)"


def report_name(stem: str, args: argparse.Namespace) -> str:
    """The report's file stem: `--quick` sweeps get their own (`bench_rope_quick`), so the full sweep of a later
    command does not overwrite them."""
    return f"{stem}_quick" if args.quick and not args.smoke else stem


def _row_key(case: dict, provider: str) -> tuple[str, str]:
    return json.dumps(case, sort_keys=True), provider


class Report:
    """One benchmark run: its planned rows, its deadline, and its files, rewritten after every row.

    Parameters
    ----------
    name : str
        File stem, e.g. "bench_rope" (see `report_name`).
    settings : dict
        Everything that is not a case parameter (dtype, repeats, head_dim, ...).
    output : Path or None
        Results folder (default `results/<device-slug>/`).
    planned : iterable of (dict, str)
        Every (case, provider) row the run means to measure, in the order it will measure them. Rows without a result
        are written as "not run": while the run goes on, as not reached (what a killed run leaves); after `finish()`,
        with the `--time-budget` that stopped it.
    time_budget : float or None
        `--time-budget`: `expired()` turns true this many seconds after the process started, once a first row has
        been added (every report carries at least one row).
    device : {"cuda", "cpu"} or None
        Where the results are measured (for the device description).
    x, y, series, panels, log_x :
        The PNG (see `plot`); `plots` adds more PNGs as `(file suffix, metric)` pairs, e.g. `(("_time", "ms_p50"),)`.
    columns : tuple of str
        Metrics shown in the markdown table (default: just `y`).
    derive : callable or None
        `derive(results)` adds metrics computed across rows (e.g. `add_relative`) before every write.
    appendix : callable or None
        `appendix(results) -> str`: markdown added under the table (e.g. a break-even table).
    """

    def __init__(self, name: str, settings: dict, output: Path | None, planned, *, time_budget: float | None = None,
                 device: str | None = None, x: str, y: str, series: tuple[str, ...] = (),
                 panels: tuple[str, ...] = (), columns: tuple[str, ...] = (), log_x: bool = True,
                 plots: tuple[tuple[str, str], ...] = (), derive: Callable[[list[Result]], None] | None = None,
                 appendix: Callable[[list[Result]], str] | None = None):
        self.name, self.settings, self.device = name, settings, device or _default_device()
        self.info = device_info(self.device)
        self.output = Path(output) if output else RESULTS_DIR / self.info["slug"]
        self.planned = [(dict(case), provider) for case, provider in planned]
        self.deadline = Deadline(time_budget)
        self.plot_args = dict(x=x, series=series, panels=panels, log_x=log_x)
        self.plots = (("", y), *plots)
        self.columns = columns or (y,)
        self.derive, self.appendix = derive, appendix
        self.measured: dict[tuple[str, str], Result] = {}
        self.finished = False
        self.write()

    def expired(self) -> bool:
        """True once the time budget is spent and a first row is in: start no new row."""
        return bool(self.measured) and self.deadline.expired()

    def add(self, result: Result) -> None:
        """Record one row, print it on one line, and rewrite the JSON and markdown."""
        self.measured[_row_key(result.case, result.provider)] = result
        summary = result.skipped or ", ".join(f"{k}={result.metrics[k]:.4g}" for k in self.columns
                                              if isinstance(result.metrics.get(k), float))
        print(f"[{self.name} {self.deadline.elapsed():6.1f} s] {json.dumps(result.case)} {result.provider}: {summary}",
              flush=True)
        self.write()

    def results(self) -> list[Result]:
        """Every planned row in plan order (a placeholder "not run" result where none was added), then any row
        added that was not planned."""
        reason = NOT_REACHED if not self.finished else self.deadline.reason() if self.deadline.expired() else "not run"
        rows = [self.measured.get(_row_key(case, provider)) or Result(self.name, provider, case, skipped=reason)
                for case, provider in self.planned]
        planned = {_row_key(case, provider) for case, provider in self.planned}
        rows += [r for key, r in self.measured.items() if key not in planned]
        if self.derive:
            self.derive(rows)
        return rows

    def write(self) -> None:
        """The JSON and the markdown (and after `finish()`, the PNGs), from every row so far."""
        rows = self.results()
        self.output.mkdir(parents=True, exist_ok=True)
        not_run = sum(1 for r in rows if r.skipped and r.skipped.startswith("not run"))
        status = {"finished": self.finished, "rows": len(rows), "not_run": not_run,
                  "skipped": sum(1 for r in rows if r.skipped) - not_run,
                  "measured": sum(1 for r in rows if not r.skipped), "seconds": round(self.deadline.elapsed(), 1),
                  "time_budget": self.deadline.seconds}
        _atomic_write(self.output / f"{self.name}.json", json.dumps(
            {"benchmark": self.name, "device": self.info, "settings": self.settings, "status": status,
             "results": [dataclasses.asdict(r) for r in rows]}, indent=1) + "\n")
        table = markdown_table(self.name, self.info, self.settings, rows, self.columns)
        if self.appendix:
            table += "\n" + self.appendix(rows)
        _atomic_write(self.output / f"{self.name}.md", table)
        if self.finished:
            for suffix, y in self.plots:
                plot(self.output / f"{self.name}{suffix}.png", self.name, self.info, rows, y=y, **self.plot_args)

    def finish(self) -> Path:
        """Mark the rows left as not run, write everything including the PNGs; returns the results folder."""
        self.finished = True
        self.write()
        print(f"[{self.name}] results in {self.output}", flush=True)
        return self.output


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and a rename: a kill mid-write leaves the previous version, never half a file."""
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(text)
    scratch.replace(path)


def random_llama(shape: dict, *, layers: int | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 seed: int = 0, **overrides):
    """A random-initialised `LlamaForCausalLM` of `shape` (e.g. `SMOLLM2_135M`), SDPA attention.

    `layers` overrides the depth (`num_hidden_layers`), `overrides` any other config field (e.g.
    `max_position_embeddings`). The weights are drawn on `device` with a fixed seed.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**shape, **overrides, **({"num_hidden_layers": layers} if layers else {})},
                         attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(name: str, info: dict, settings: dict, results: list[Result], columns: tuple[str, ...]) -> str:
    """One row per result: the case keys, the provider, then `columns` (a skipped provider shows its reason)."""
    case_keys = list(dict.fromkeys(k for r in results for k in r.case))
    versions = ", ".join(f"{k} {info[k]}" for k in ("torch", "cuda", "triton", "transformers") if info.get(k))
    lines = [f"# {name} on {info['name']}", "", f"{versions}; {info['date']}.", "",
             f"Settings: `{json.dumps(settings)}`", "",
             "| " + " | ".join(case_keys + ["provider"] + list(columns)) + " |",
             "|" + "---|" * (len(case_keys) + 1 + len(columns))]
    for r in results:
        cells = [_fmt(r.case.get(k)) for k in case_keys] + [r.provider]
        if r.skipped:
            reason = r.skipped if r.skipped.startswith("not run") else f"skipped: {r.skipped}"
            cells += [reason.replace("|", "/")] + ["-"] * (len(columns) - 1)
        else:
            cells += [_fmt(r.metrics.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(path: Path, name: str, info: dict, results: list[Result], x: str, y: str, series: tuple[str, ...] = (),
         panels: tuple[str, ...] = (), log_x: bool = True) -> None:
    """A PNG of `y` against `x`: one panel per `panels` combination, one line per provider (+ `series`) in each.

    Without matplotlib (the plots are optional) nothing is written: the JSON and markdown hold every number."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no {path.name}", flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in results:
        if r.skipped or r.metrics.get(y) is None or x not in r.case:
            continue
        panel = ", ".join(f"{k}={r.case.get(k)}" for k in panels)
        label = " ".join([r.provider] + [f"{k}={r.case.get(k)}" for k in series])
        grouped.setdefault(panel, {}).setdefault(label, []).append((r.case[x], r.metrics[y]))
    count = max(1, len(grouped))
    columns = min(2, count)
    rows = (count + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(7 * columns, 4.5 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    # one colour per line label across all panels, so a provider reads the same everywhere
    labels = sorted({label for lines in grouped.values() for label in lines})
    palette = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    colours = {label: palette(i % palette.N) for i, label in enumerate(labels)}
    for ax, (panel, lines) in zip(axes.flat, sorted(grouped.items())):
        for label, points in sorted(lines.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label, color=colours[label])
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title(panel or name, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{name} on {info['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
