"""Test-wide setup, before anything imports triton or ctxext_kernels:
- Triton runs in its CPU interpreter when no GPU is present;
- `import ctxext_kernels` leaves transformers stock (CTXEXT_NO_PATCH=1): many tests use stock transformers as the
  oracle, and the ones about the patch call patch()/unpatch() themselves (test_import_patch checks the import-time
  patch in fresh interpreters).

GPU tests: a test that runs kernels on CUDA tensors carries the `gpu` marker (`@pytest.mark.gpu` on the test, or
`pytest.param(..., marks=pytest.mark.gpu)` on its GPU parameters). `pytest -m gpu` selects exactly them: that is how
benchmarks/run_all.sh's first stage on a lent GPU finds every GPU test, a new one included, and nothing else. Without a
GPU they skip here. Two guards keep the marker honest:
- an unmarked test that skips for want of a GPU (its reason names a GPU or a CUDA device) fails: the GPU run would
  never select it;
- with CTXEXT_REQUIRE_GPU=1 (the GPU stage sets it) a `gpu` test that skips fails: on a GPU machine a skip means a
  backend did not build or load.
"""

import os
import re

import pytest

if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidia0"):
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["CTXEXT_NO_PATCH"] = "1"

SKIPPED_FOR_A_GPU = re.compile(r"\bGPU\b|CUDA device")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs kernels on CUDA tensors (selected by `-m gpu`; skips without a GPU)")


def pytest_collection_modifyitems(config, items):
    import torch

    no_gpu = pytest.mark.skip(reason="needs a GPU (torch sees no CUDA device)")
    for item in items:
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(no_gpu)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if not report.skipped or report.longrepr is None:
        return
    reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    if item.get_closest_marker("gpu"):
        if os.environ.get("CTXEXT_REQUIRE_GPU") == "1":
            report.outcome = "failed"
            report.longrepr = f"a GPU test skipped on the GPU run (CTXEXT_REQUIRE_GPU=1): {reason}"
    elif SKIPPED_FOR_A_GPU.search(reason):
        report.outcome = "failed"
        report.longrepr = (f"skipped for want of a GPU ({reason}) but not marked `gpu`: the GPU run (`pytest -m gpu`, "
                           "benchmarks/run_all.sh) would never select it; add @pytest.mark.gpu")
