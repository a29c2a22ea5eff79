#!/usr/bin/env bash
# README command two: set up ./.venv and run the test suite. On a machine without a GPU the Triton kernels run in
# Triton's CPU interpreter, the CUDA code's math through its host build, and GPU-only tests skip.
# Extra arguments go to pytest (e.g. scripts/test.sh -k rope).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh

# The host build of the CUDA code's math is part of every install that had a C++ compiler: its tests must not skip.
export CTXEXT_REQUIRE_HOST_BUILD=1
python -m pytest tests -q "$@"
