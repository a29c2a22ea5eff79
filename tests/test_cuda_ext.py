"""The extension loader's verdicts (ops/cuda_ext.py), with a stand-in for `_C` and for the GPU: no GPU needed."""

from types import SimpleNamespace

import pytest
import torch

from ctxext_kernels.ops import cuda_ext


def _status(monkeypatch, ext, *, gpu=None, torch_cuda="13.0"):
    """cuda_ext.status() (uncached) with `ext` as the extension and `gpu` as the device capability (None: no GPU)."""
    monkeypatch.setattr(cuda_ext, "_load", lambda: (ext, "" if ext else "extension not built (test)"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu is not None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: gpu)
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    return cuda_ext.status.__wrapped__()


def _ext(archs=("80", "90"), version="13.0"):
    return SimpleNamespace(has_cuda=True, cuda_archs=list(archs), cuda_version=version)


def test_missing_extension_disables_both(monkeypatch):
    assert _status(monkeypatch, None) == (False, False, "extension not built (test)")


def test_host_only_build(monkeypatch):
    ext = SimpleNamespace(has_cuda=False, cuda_archs=[], cuda_version=None)
    cuda_ok, host_ok, reason = _status(monkeypatch, ext, gpu=(9, 0))
    assert (cuda_ok, host_ok) == (False, True) and "built without CUDA" in reason


def test_no_gpu(monkeypatch):
    assert _status(monkeypatch, _ext()) == (False, True, "torch sees no CUDA device")


def test_gpu_older_than_every_built_arch_warns(monkeypatch):
    with pytest.warns(RuntimeWarning, match="built for sm_80,sm_90 but the GPU is sm_75"):
        cuda_ok, host_ok, _ = _status(monkeypatch, _ext(), gpu=(7, 5))
    assert (cuda_ok, host_ok) == (False, True)


def test_cuda_major_mismatch_warns(monkeypatch):
    with pytest.warns(RuntimeWarning, match="built with CUDA 13.0 but torch uses CUDA 12.8"):
        assert not _status(monkeypatch, _ext(), gpu=(9, 0), torch_cuda="12.8")[0]


@pytest.mark.parametrize("gpu", [(8, 0), (9, 0), (8, 9), (12, 0)])
def test_gpu_at_or_above_a_built_arch_is_usable(monkeypatch, gpu):
    # Every arch carries PTX as well as SASS, so newer GPUs JIT-compile it.
    assert _status(monkeypatch, _ext(), gpu=gpu) == (True, True, "")


def test_launch_without_extension_says_why(monkeypatch):
    monkeypatch.setattr(cuda_ext, "_load", lambda: (None, "extension not built (test)"))
    q = torch.zeros(1, 1, 1, 4)
    with pytest.raises(RuntimeError, match="extension not built"):
        cuda_ext.rope_forward(q, None, q, None, torch.zeros(1, 1, dtype=torch.int64), torch.ones(2), 1.0, False,
                              False, True)
