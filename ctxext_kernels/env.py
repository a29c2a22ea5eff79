"""`python -m ctxext_kernels.env` / `ctxext-env`: what this install is made of and which backends run here.

Prints the package, torch (and its CUDA), the toolkit and archs the extension was built with, transformers, triton,
flash-attn and liger-kernel versions, the GPUs torch sees, and every backend with the reason it is or is not usable.
Never fails on a machine that lacks any of these: a missing piece is reported, not raised.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    """The report as a dict (what `--json` prints)."""
    import torch

    import ctxext_kernels
    from ctxext_kernels.ops import attention_backends, backends

    try:
        ext = importlib.import_module("ctxext_kernels._C")
        extension = {"built": True, "has_cuda": bool(getattr(ext, "has_cuda", False)),
                     "cuda_version": getattr(ext, "cuda_version", None) or None,
                     "cuda_archs": list(getattr(ext, "cuda_archs", []))}
    except ImportError as exc:
        extension = {"built": False, "reason": str(exc)}
    gpus = [{"name": torch.cuda.get_device_name(i), "sm": "%d%d" % torch.cuda.get_device_capability(i)}
            for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        # the installed distribution's version carries the wheel's CUDA tag (0.1.0+cu130); a source tree has none
        "ctxext_kernels": (lambda v: ctxext_kernels.__version__ if v == "not installed" else v)(
            _version("ctxext_kernels")),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension": extension,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "flash_attn": _version("flash-attn"),
        "liger_kernel": _version("liger-kernel"),
        "gpus": gpus,
        "rope_backends": {name: {"usable": ok, "reason": why} for name, (ok, why) in backends().items()},
        "attention_backends": {name: {"usable": ok, "reason": why} for name, (ok, why) in
                               attention_backends().items()},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    report = collect()
    if parser.parse_args(argv).json:
        print(json.dumps(report, indent=1))
        return
    ext = report["extension"]
    built = (f"built, CUDA {ext['cuda_version']} for {', '.join(ext['cuda_archs']) or '-'}" if ext.get("has_cuda")
             else "host build only (no CUDA)" if ext["built"] else f"not built ({ext['reason']})")
    rows = [("ctxext_kernels", report["ctxext_kernels"]), ("extension", built),
            ("torch", f"{report['torch']} (CUDA {report['torch_cuda'] or 'none'})")]
    rows += [(name, report[name]) for name in ("transformers", "triton", "flash_attn", "liger_kernel")]
    rows.append(("GPUs", ", ".join(f"{g['name']} (sm_{g['sm']})" for g in report["gpus"]) or "none"))
    for title in ("rope_backends", "attention_backends"):
        for name, entry in report[title].items():
            rows.append((f"{title.split('_')[0]}:{name}", ("yes - " if entry["usable"] else "no - ") + entry["reason"]))
    width = max(len(key) for key, _ in rows)
    print("\n".join(f"{key:<{width}}  {value}" for key, value in rows))


if __name__ == "__main__":
    main()
