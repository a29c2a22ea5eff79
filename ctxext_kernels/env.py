"""`python -m ctxext_kernels.env` / `ctxext-env`: what this install is made of and which backends run here.

Prints the package version, Python, torch (and the CUDA it was built with), the CUDA toolkit and archs the native
extension was compiled with, transformers, triton, flash-attn and liger-kernel versions, the GPUs torch sees (and whether
the extension has code for them), and every RoPE / attention backend with the reason it is or is not usable.
Never fails on a machine that lacks any of these: a missing piece is reported as such, not raised.

    python -m ctxext_kernels.env          # a two-column text report
    python -m ctxext_kernels.env --json   # the same as JSON (what bug reports and benchmark results attach)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import platform

NOT_INSTALLED = "not installed"
PEERS = {"transformers": "transformers", "triton": "triton", "flash_attn": "flash-attn", "liger_kernel": "liger-kernel"}


def _distribution_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


def _failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".rstrip(": ")


def _package_version() -> str:
    try:
        return importlib.import_module("ctxext_kernels._version").__version__
    except (ImportError, AttributeError):
        return "unknown"


def _extension() -> dict:
    """How `ctxext_kernels._C` was built: `{"built", "has_cuda", "cuda_version", "cuda_archs"}` or the import error."""
    try:
        ext = importlib.import_module("ctxext_kernels._C")
    except ImportError as exc:
        return {"built": False, "reason": f"not built ({_failure(exc)})"}
    return {"built": True, "has_cuda": bool(getattr(ext, "has_cuda", False)),
            "cuda_version": getattr(ext, "cuda_version", None) or None,
            "cuda_archs": [str(arch) for arch in getattr(ext, "cuda_archs", [])]}


def _torch() -> tuple[dict, list[dict]]:
    """torch's version and CUDA, and the GPUs it sees (`name`, `sm`)."""
    try:
        import torch
    except ImportError as exc:
        return {"version": NOT_INSTALLED, "cuda": None, "reason": _failure(exc)}, []
    info = {"version": torch.__version__, "cuda": torch.version.cuda}
    gpus = []
    try:
        for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            major, minor = torch.cuda.get_device_capability(index)
            gpus.append({"index": index, "name": torch.cuda.get_device_name(index), "sm": f"{major}{minor}"})
    except RuntimeError as exc:  # a driver that torch cannot talk to
        info["cuda_error"] = _failure(exc)
    return info, gpus


def _arch_compiled_in(sm: str, archs: list[str]) -> bool:
    """The extension runs on `sm` when it has an arch at or below it (every arch is built as SASS + PTX)."""
    return any(int(arch.rstrip("af")) <= int(sm) for arch in archs if arch.rstrip("af").isdigit())


def _backends() -> dict:
    """`{"rope": {name: {"usable", "reason"}}, "attention": {...}}`, or why the package would not import."""
    try:
        ops = importlib.import_module("ctxext_kernels.ops")
    except Exception as exc:  # noqa: BLE001 - report any import failure (missing torch, broken install) as text
        return {"error": f"ctxext_kernels.ops does not import: {_failure(exc)}"}
    report = {}
    for family, function in (("rope", "backends"), ("attention", "attention_backends")):
        try:
            table = getattr(ops, function)()
            report[family] = {name: {"usable": bool(ok), "reason": why} for name, (ok, why) in table.items()}
        except Exception as exc:  # noqa: BLE001 - one family failing must not hide the other
            report[family] = {"error": _failure(exc)}
    return report


def collect() -> dict:
    """The whole report as a dict (what `--json` prints)."""
    torch_info, gpus = _torch()
    extension = _extension()
    for gpu in gpus:
        gpu["extension_has_code"] = extension.get("has_cuda", False) and _arch_compiled_in(
            gpu["sm"], extension.get("cuda_archs", []))
    return {
        "ctxext_kernels": _package_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch_info["version"],
        "torch_cuda": torch_info["cuda"],
        "extension": extension,
        **{key: _distribution_version(distribution) for key, distribution in PEERS.items()},
        "gpus": gpus,
        "backends": _backends(),
    }


def _extension_text(ext: dict) -> str:
    if not ext["built"]:
        return ext["reason"]
    if not ext["has_cuda"]:
        return "host build only (no CUDA kernels: built without nvcc or with CTXEXT_BUILD_CUDA=0)"
    archs = ", ".join(f"sm_{arch}" for arch in ext["cuda_archs"]) or "no archs recorded"
    return f"CUDA {ext['cuda_version'] or 'version not recorded'}, {archs}"


def format_text(report: dict) -> str:
    """The report as two aligned columns."""
    rows = [("ctxext_kernels", report["ctxext_kernels"]), ("python", f"{report['python']} ({report['platform']})"),
            ("torch", f"{report['torch']} (CUDA {report['torch_cuda'] or 'none'})"),
            ("extension", _extension_text(report["extension"]))]
    rows += [(key, report[key]) for key in PEERS]
    gpus = [f"{g['name']} (sm_{g['sm']}, extension code: {'yes' if g['extension_has_code'] else 'no'})"
            for g in report["gpus"]]
    rows.append(("GPUs", "; ".join(gpus) or "none seen by torch"))
    backends = report["backends"]
    if "error" in backends:
        rows.append(("backends", backends["error"]))
    for family, table in backends.items():
        if family == "error":
            continue
        if "error" in table:
            rows.append((f"{family} backends", table["error"]))
            continue
        for name, entry in table.items():
            rows.append((f"{family}:{name}", f"{'yes' if entry['usable'] else 'no '} - {entry['reason']}"))
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ctxext-env", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = collect()
    print(json.dumps(report, indent=1) if args.json else format_text(report))


if __name__ == "__main__":
    main()
