#!/usr/bin/env bash
# The run on a lent GPU, planned to the minute. Such a machine gives a session 15 minutes of device time in all (its
# start, every command, every idle wait) and 10 minutes per command; this script spends them in two commands:
#
#   stage 1 (<= 6 min): build the extension for sm_90; the GPU correctness tests of both kernel families (pytest -m gpu:
#            Triton and CUDA backends on CUDA tensors against the float64 oracles, every failure shown); then
#            bench_rope --quick and bench_attention --quick
#   stage 2 (<= 4 min): the build again only on a fresh machine; bench_model --quick, bench_pose_vs_full --quick (a
#            SmolLM2-shaped random model), then the full bench_attention and bench_rope sweeps with what is left
#
#   bash benchmarks/run_all.sh --stage 1          # the first device command (benchmarks/README.md has the exact calls)
#   bash benchmarks/run_all.sh --stage 2          # the second, right after it
#   bash benchmarks/run_all.sh --smoke --budget 1 # the CPU dress rehearsal (CI: tests/test_run_all.py)
#
# Options:
#   --stage 1|2|all   which stage (default all: both, budgets 6:4)
#   --budget SECONDS  the stage's time (default 360 for stage 1, 240 for stage 2, 600 for all); steps share what is
#                     left in proportion to their weights, so time one step leaves goes to the next ones. A step always
#                     runs (a benchmark then measures its first row and marks the rest "not run")
#   --smoke           the same stages on the CPU: tiny shapes, Triton's interpreter, no build (the installed package),
#                     GPU tests collected and skipped; the full sweeps are skipped (identical to the quick ones here)
#   --output DIR      results folder (default benchmarks/results/<device-slug>/)
#
# It prints first the device and the versions, then one line per step, then a table of what each step took. Results:
# every benchmark's JSON + markdown (rewritten after every row) and PNG, env.json, logs/ (one per step, pytest_gpu.log
# among them) and run_all_stage<N>.md. With $OUT set (the device tool's folder), $OUT/stage<N>.log is the whole output
# and $OUT/results-stage<N>.tar.gz the results folder, re-packed after every step: a command killed at its limit still
# brings back every step that finished.
#
# Environment: PYTHON (default python3), CTXEXT_CUDA_ARCHS (default 90), GPU_TEST_WORKERS (pytest-xdist workers for the
# GPU tests, default 12; the Triton JIT compiles of the fused kernels dominate that step and run in parallel this way).
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
STAGE=all SMOKE=0 BUDGET="" RESULTS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --stage) STAGE="${2:-}"; shift 2 ;;
        --budget) BUDGET="${2:-}"; shift 2 ;;
        --smoke) SMOKE=1; shift ;;
        --output) RESULTS="${2:-}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "run_all.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
case "$STAGE" in 1|2|all) ;; *) echo "run_all.sh: --stage must be 1, 2 or all, got '$STAGE'" >&2; exit 2 ;; esac
if [ -n "$BUDGET" ] && ! [[ "$BUDGET" =~ ^[0-9]+$ ]]; then
    echo "run_all.sh: --budget must be whole seconds, got '$BUDGET'" >&2; exit 2
fi

PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the tree's package, its extension built in place
export PYTHONUNBUFFERED=1
if [ "$SMOKE" = 1 ]; then
    export TRITON_INTERPRET=1
    export OMP_NUM_THREADS=1  # tiny shapes: on a busy 2-core CI machine thread-pool wake-ups cost more than they give
    FLOOR=120 MARGIN=5 BENCH_FLAGS=(--smoke)
else
    unset TRITON_INTERPRET  # the GPU runs the compiled Triton kernels
    # a step gets at least FLOOR seconds; a benchmark stops starting rows MARGIN seconds before its share ends (the row
    # in flight, a first Triton compile, the PNG)
    FLOOR=45 MARGIN=25 BENCH_FLAGS=(--quick)
fi
BUILD_MAX=180
# the plan: each step's weight in its stage's time (benchmarks/README.md, "On a lent GPU", has the expected times)
W_TESTS=130 W_ROPE_QUICK=55 W_ATTENTION_QUICK=85                   # stage 1, after the build
W_MODEL=60 W_POSE=60 W_ATTENTION=60 W_ROPE=50                       # stage 2, after the build (if any)

# ------------------------------------------------------------------------------------------------ results and logs
if [ -z "$RESULTS" ]; then
    slug="$("$PYTHON" -c 'import sys; sys.path.insert(0, "benchmarks"); import harness
print(harness.device_info()["slug"])')"
    RESULTS="benchmarks/results/${slug:-unknown-device}"
fi
mkdir -p "$RESULTS/logs"
STAGE_NAME="stage$STAGE"
[ "$STAGE" = all ] && STAGE_NAME="stages"
TEE_PID=""
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/$STAGE_NAME.log") 2>&1
    TEE_PID=$!
fi

pack() {  # the results folder into $OUT, atomically: a kill mid-pack leaves the previous archive
    [ -n "${OUT:-}" ] || return 0
    tar -czf "$OUT/.results.tmp" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" \
        && mv -f "$OUT/.results.tmp" "$OUT/results-$STAGE_NAME.tar.gz"
}

RUN_START=$(date +%s)
STEPS=()  # "stage|step|budget|took|status" rows for the summary
FAILED=()
now() { date +%s; }
log() { echo "=== [$(($(now) - RUN_START)) s] $*"; }

# ------------------------------------------------------------------------------------------------------- header
"$PYTHON" - <<'EOF'
import importlib.metadata as metadata
import platform
import shutil
import subprocess

def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"

smi = shutil.which("nvidia-smi")
device = "no GPU (nvidia-smi not found)"
if smi:
    query = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True)
    device = query.stdout.strip() or f"nvidia-smi failed: {query.stderr.strip()}"
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
           platform.processor())
nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
try:
    lines = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.splitlines()
    nvcc = next((line.strip() for line in lines if "release" in line), "version not reported")
except OSError:
    nvcc = "not found"
print(f"device:   {device}")
print(f"host:     {cpu}")
print(f"versions: python {platform.python_version()}, torch {version('torch')}, triton {version('triton')}, "
      f"transformers {version('transformers')}, nvcc: {nvcc}")
EOF
log "run_all.sh --stage $STAGE$([ "$SMOKE" = 1 ] && echo " --smoke") -> $RESULTS"

# ------------------------------------------------------------------------------------------------------- helpers
# run_step STAGE NAME BUDGET COMMAND...: run COMMAND under `timeout BUDGET`, its output into logs/NAME.log (the tail
# on the console when it fails), record the time it took, re-pack the results
run_step() {
    local stage="$1" name="$2" budget="$3" start status took
    shift 3
    start=$(now)
    log "$name (at most ${budget} s): $*"
    timeout -k 10 "$budget" "$@" >"$RESULTS/logs/$name.log" 2>&1
    status=$?
    took=$(($(now) - start))
    local verdict=ok
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        verdict="timeout"
    elif [ "$status" -ne 0 ]; then
        verdict="failed (exit $status)"
    fi
    [ "$verdict" = ok ] || { FAILED+=("$name: $verdict"); tail -25 "$RESULTS/logs/$name.log"; }
    log "$name: $verdict in ${took} s"
    STEPS+=("$stage|$name|$budget|$took|$verdict")
    pack
}

# share STAGE_END WEIGHT REST_WEIGHTS: this step's seconds, its weight's part of what is left of the stage (>= 0)
share() {
    local left=$(($1 - $(now)))
    echo $((left > 0 ? left * $2 / ($2 + $3) : 0))
}

at_least_floor() { echo $(($1 > FLOOR ? $1 : FLOOR)); }

bench() {  # bench STAGE_END WEIGHT REST_WEIGHTS SCRIPT [FLAGS...]: a benchmark with its share as --time-budget
    local end="$1" weight="$2" rest="$3" script="$4" seconds name
    shift 4
    seconds=$(share "$end" "$weight" "$rest")
    name="$script"
    [[ " $* " == *" --quick "* ]] && name="${script}_quick"
    # --time-budget counts from the script's start; the timeout (at least FLOOR) is the backstop
    run_step "$CURRENT" "$name" "$(at_least_floor "$seconds")" "$PYTHON" "benchmarks/$script.py" "$@" \
        --output "$RESULTS" --time-budget $((seconds > MARGIN ? seconds - MARGIN : 0))
    [ -f "$RESULTS/$name.md" ] && [ "$SMOKE" = 0 ] && cat "$RESULTS/$name.md"
}

install_wheels() {  # packages the GPU image lacks (liger-kernel: benchmarks/fetch_wheels.sh) travel in .whl/
    local wheels=()
    for wheel in .whl/*.whl; do
        [ -e "$wheel" ] && [[ "$(basename "$wheel")" != ctxext_kernels-* ]] && wheels+=("$wheel")
    done
    [ "${#wheels[@]}" -gt 0 ] || return 0
    log "installing carried wheels: ${wheels[*]}"
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "${wheels[@]}"; then
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    else
        FAILED+=("wheels")
    fi
}

wheel_module() {  # wheel_module EXT_SUFFIX: _C from a prebuilt wheel in .whl/ made for this Python, if there is one
    "$PYTHON" - "$1" <<'EOF'
import glob, sys, zipfile
member = f"ctxext_kernels/_C{sys.argv[1]}"
for wheel in sorted(glob.glob(".whl/ctxext_kernels-*.whl")):
    with zipfile.ZipFile(wheel) as archive:
        if member in archive.namelist():
            archive.extract(member, ".")  # next to the tree's Python code, which is what runs
            print(f"=== build: {member} taken from {wheel}")
            sys.exit(0)
sys.exit(1)
EOF
}

ENV_WRITTEN=0
build() {  # the extension for this GPU, in place (or a prebuilt wheel's); --smoke uses the package as installed
    local suffix
    suffix="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
    if [ "$SMOKE" = 1 ]; then
        log "build: --smoke uses the package as installed (no compile)"
    elif [ -f "ctxext_kernels/_C$suffix" ]; then
        log "build: ctxext_kernels/_C$suffix is already here (the machine is still warm from stage 1)"
    elif wheel_module "$suffix"; then
        ENV_WRITTEN=0
    else
        # about 40 s on 16 cores, given up to BUILD_MAX whatever the stage has left: nothing after it runs without.
        # CTXEXT_BUILD_CUDA=1: a CUDA compile error fails the step instead of quietly building the host part only
        run_step "$CURRENT" build "$BUILD_MAX" env CTXEXT_BUILD_CUDA=1 CTXEXT_CUDA_ARCHS="${CTXEXT_CUDA_ARCHS:-90}" \
            MAX_JOBS="$(nproc)" "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
        grep -E "ctxext_kernels: (building|_C built)" "$RESULTS/logs/build.log"
        ENV_WRITTEN=0
    fi
    [ "$ENV_WRITTEN" = 1 ] && return 0  # --stage all: stage 1 already described this build
    # what was built and which backends run: env.json, and the same as text in the log
    "$PYTHON" -c "import json, sys; from ctxext_kernels import env; r = env.collect(); \
open(sys.argv[1], 'w').write(json.dumps(r, indent=1) + '\n'); print(env.format_text(r))" "$RESULTS/env.json" \
        || FAILED+=("env")
    ENV_WRITTEN=1
}

gpu_tests() {  # gpu_tests STAGE_END: pytest -m gpu, every GPU test of the tree (tests/conftest.py), no CPU-only ones
    local budget args=(-m gpu --maxfail=25 -p no:cacheprovider -rfEs --durations=15)
    budget=$(at_least_floor "$(share "$1" "$W_TESTS" $((W_ROPE_QUICK + W_ATTENTION_QUICK)))")
    if [ "$SMOKE" = 0 ]; then
        args+=(-v)  # one line per test as it finishes: a killed run still shows what passed
        "$PYTHON" -c "import xdist" 2>/dev/null && args+=(-n "${GPU_TEST_WORKERS:-12}")
        "$PYTHON" -c "import pytest_timeout" 2>/dev/null && args+=(--timeout=150)
    fi
    # on the GPU a GPU test that skips fails (CTXEXT_REQUIRE_GPU=1): there a skip means a backend did not build
    run_step "$CURRENT" pytest_gpu "$budget" env CTXEXT_REQUIRE_GPU=$((1 - SMOKE)) "$PYTHON" -m pytest tests \
        "${args[@]}"
    grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed|skipped|deselected)" "$RESULTS/logs/pytest_gpu.log" | tail -30
}

stage_summary() {  # stage_summary STAGE STAGE_START BUDGET: run_all_stage<N>.md and the console table
    local stage="$1" took=$(($(now) - $2)) file="$RESULTS/run_all_stage$1.md"
    {
        echo "# run_all.sh stage $stage: ${took} s of a ${3} s budget$([ "$SMOKE" = 1 ] && echo " (--smoke)")"
        echo
        echo "| step | budget (s) | took (s) | status |"
        echo "|---|---|---|---|"
        for row in "${STEPS[@]}"; do
            IFS='|' read -r s name budget step_took status <<<"$row"
            [ "$s" = "$stage" ] && echo "| $name | $budget | $step_took | $status |"
        done
    } >"$file"
    cat "$file"
    pack
}

# ------------------------------------------------------------------------------------------------------- stages
stage1() {  # stage1 BUDGET
    local start end
    start=$(now) end=$(($(now) + $1)) CURRENT=1
    install_wheels
    build
    gpu_tests "$end"
    bench "$end" "$W_ROPE_QUICK" "$W_ATTENTION_QUICK" bench_rope "${BENCH_FLAGS[@]}"
    bench "$end" "$W_ATTENTION_QUICK" 0 bench_attention "${BENCH_FLAGS[@]}"
    stage_summary 1 "$start" "$1"
}

stage2() {  # stage2 BUDGET
    local start end
    start=$(now) end=$(($(now) + $1)) CURRENT=2
    install_wheels
    build
    bench "$end" "$W_MODEL" $((W_POSE + W_ATTENTION + W_ROPE)) bench_model "${BENCH_FLAGS[@]}"
    bench "$end" "$W_POSE" $((W_ATTENTION + W_ROPE)) bench_pose_vs_full "${BENCH_FLAGS[@]}"
    if [ "$SMOKE" = 1 ]; then
        log "full sweeps: skipped in --smoke (the smoke shapes have no quick/full difference: stage 1 ran them)"
    else
        bench "$end" "$W_ATTENTION" "$W_ROPE" bench_attention
        bench "$end" "$W_ROPE" 0 bench_rope
    fi
    stage_summary 2 "$start" "$1"
}

case "$STAGE" in
    1) stage1 "${BUDGET:-360}" ;;
    2) stage2 "${BUDGET:-240}" ;;
    all) total="${BUDGET:-600}"; stage1 $((total * 6 / 10)); stage2 $((total - total * 6 / 10)) ;;
esac
pack
log "done in $(($(now) - RUN_START)) s; failed: ${FAILED[*]:-none}"
status=$((${#FAILED[@]} > 0))
if [ -n "$TEE_PID" ]; then  # let tee write the last lines into $OUT before the command returns
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null
fi
exit "$status"
