"""What the native module reports about its own build, and what the loader concludes from it on this machine."""

import importlib
import os
import re

import pytest
import torch

try:
    _C = importlib.import_module("ctxext_kernels._C")
except ImportError as exc:
    if os.environ.get("CTXEXT_REQUIRE_HOST_BUILD") == "1":
        raise
    pytest.skip(f"ctxext_kernels._C is not built ({exc}); reinstall with a C++ compiler", allow_module_level=True)

from ctxext_kernels.ops import cuda_ext  # noqa: E402


def test_build_description_is_consistent():
    assert isinstance(_C.has_cuda, bool)
    assert _C.max_position == 2**24 - 1
    if _C.has_cuda:
        assert re.fullmatch(r"\d+\.\d+", _C.cuda_version), _C.cuda_version
        assert _C.cuda_archs and all(re.fullmatch(r"\d+[af]?", arch) for arch in _C.cuda_archs), _C.cuda_archs
    else:
        assert _C.cuda_version is None and _C.cuda_archs == []
        with pytest.raises(RuntimeError, match="built without CUDA"):
            _C.rope_cuda(_C.RopeArgs())


def test_build_honours_the_requested_archs():
    # CI builds with CTXEXT_CUDA_ARCHS set; the module must report exactly those archs.
    requested = os.environ.get("CTXEXT_CUDA_ARCHS")
    if not (_C.has_cuda and requested):
        pytest.skip("needs a CUDA build made with CTXEXT_CUDA_ARCHS set")
    # setup.py also reads torch's spelling ("8.0 9.0a+PTX").
    assert _C.cuda_archs == [arch.removesuffix("+PTX").replace(".", "") for arch in re.split(r"[;,\s]+", requested)
                             if arch]


def test_status_explains_itself():
    cuda_usable, host_usable, reason = cuda_ext.status()
    assert host_usable
    if not _C.has_cuda:
        assert not cuda_usable and "without CUDA" in reason
    elif not torch.cuda.is_available():
        assert not cuda_usable and reason == "torch sees no CUDA device"
    else:
        assert cuda_usable == (reason == ""), reason
