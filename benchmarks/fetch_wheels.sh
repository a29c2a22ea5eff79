#!/usr/bin/env bash
# The Python packages a lent GPU machine lacks, downloaded into .whl/ (git ignores it; the device call names it in
# `carry`, and run_all.sh installs what it finds there). That machine reaches no network. Its image has torch 2.11,
# triton 3.6, transformers 5.17, matplotlib, pytest with pytest-xdist and pytest-timeout; it lacks Liger-Kernel, a peer
# of bench_rope (flash-attn is not carried: no wheel for that torch, and its rows say "not installed").
# Then prints what a device call carries: the tree (tracked and untracked-not-ignored files) plus .whl/, which must stay
# under 64 MiB.
#
#   bash benchmarks/fetch_wheels.sh      # needs PyPI; PYTHON picks the pip (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
LIMIT=$((64 * 1024 * 1024))

# the GPU image's Python is 3.12 on x86-64 (pure-Python wheels match any platform)
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl liger-kernel==0.8.5

tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
wheels=$(du -cb .whl | tail -1 | cut -f1)
echo "a device call carries: tree $((tree / 1024)) KiB + .whl/ $((wheels / 1024)) KiB" \
    "= $(((tree + wheels) / 1024)) KiB of $((LIMIT / 1024))"
ls -l .whl
[ $((tree + wheels)) -lt "$LIMIT" ] || { echo "over the 64 MiB a device call carries" >&2; exit 1; }
