#!/usr/bin/env bash
# The one command a GPU session runs: install carried wheels, build the CUDA extension for this GPU, report the
# environment, run the test suite on the GPU, then every benchmark script present, inside one 10-minute command.
#
#   bash benchmarks/run_all.sh                    # everything (quick sweeps), ~8 minutes in all at most
#   STAGES="build bench" bash benchmarks/run_all.sh   # a subset: any of wheels build env tests bench
#   STAGES="wheels build bench" BENCHMARKS="bench_rope" bash benchmarks/run_all.sh   # one benchmark, all the time
#   BENCH_ARGS="" TOTAL_BUDGET=1500 bash benchmarks/run_all.sh   # full sweeps, on a machine without a time limit
#
# Results: benchmarks/results/<device-slug>/ (JSON + markdown + PNG per benchmark, env.json, pytest.log), copied with
# every log to $OUT/ when OUT is set (the device tool brings $OUT back; the repository copy there does not come back).
#
# Environment:
#   STAGES         stages to run, in this order (default: "wheels build env tests bench")
#   TOTAL_BUDGET   seconds for the whole run (default 540: a 600-second command with margin for copying results)
#   BENCH_ARGS     flags for every benchmark script (default "--quick")
#   BENCHMARKS     scripts to run, in order (default "bench_rope bench_attention bench_model bench_pose_vs_full");
#                  those absent are skipped; each gets an equal share of the time left when it starts
#   CTXEXT_CUDA_ARCHS  archs to build (default 90)
#   PYTEST_ARGS    extra pytest arguments (e.g. "-k rope")
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
STAGES="${STAGES:-wheels build env tests bench}"
TOTAL_BUDGET="${TOTAL_BUDGET:-540}"
BENCH_ARGS="${BENCH_ARGS---quick}"
export CTXEXT_CUDA_ARCHS="${CTXEXT_CUDA_ARCHS:-90}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the GPU runs the real Triton kernels, not the CPU interpreter
PYTHON="${PYTHON:-python3}"
read -r -a BENCHMARKS <<<"${BENCHMARKS:-bench_rope bench_attention bench_model bench_pose_vs_full}"
FAILED=()

# seconds left of TOTAL_BUDGET, at least 1 (`timeout 0` would mean no limit at all)
left() { local s=$((TOTAL_BUDGET - ($(date +%s) - START))); echo $((s > 1 ? s : 1)); }
want() { [[ " $STAGES " == *" $1 "* ]]; }
log() { echo "=== [$(($(date +%s) - START)) s] $*"; }

LOGS="$(mktemp -d)"
if want wheels && compgen -G ".whl/*.whl" >/dev/null; then
    # packages the GPU image lacks (liger-kernel, gguf, ...) travel as wheels: the machine has no network
    log "installing carried wheels: $(ls .whl | tr '\n' ' ')"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" || FAILED+=(wheels)
fi

if want build; then
    log "building ctxext_kernels for sm_${CTXEXT_CUDA_ARCHS} (CTXEXT_BUILD_CUDA=1: a CUDA compile error fails)"
    # no build isolation and no dependencies: nothing can be downloaded there, and torch & co. are installed
    CTXEXT_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" timeout "$(left)" "$PYTHON" -m pip install --no-build-isolation \
        --no-deps -e . >"$LOGS/build.log" 2>&1 || { FAILED+=(build); tail -40 "$LOGS/build.log"; }
    grep -E "ctxext_kernels: (building|_C built)" "$LOGS/build.log"
fi

SLUG="$("$PYTHON" -c 'import sys; sys.path.insert(0, "benchmarks"); import harness; print(harness.device_info()["slug"])')"
RESULTS="benchmarks/results/${SLUG:-unknown-device}"
mkdir -p "$RESULTS"
log "results in $RESULTS"

if want env; then
    "$PYTHON" -m ctxext_kernels.env | tee "$LOGS/env.txt"
    "$PYTHON" -m ctxext_kernels.env --json >"$RESULTS/env.json" || FAILED+=(env)
fi

if want tests; then
    # the tests get at most a third of what is left: the benchmarks need the rest
    budget=$(( $(left) / 3 + 1 ))
    log "GPU test suite (at most ${budget} s)"
    # shellcheck disable=SC2086
    timeout "$budget" "$PYTHON" -m pytest tests -x -q -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 \
        | tee "$LOGS/pytest.log" | tail -25
    status=${PIPESTATUS[0]}
    [ "$status" -eq 0 ] || FAILED+=("tests(exit $status)")
    cp "$LOGS/pytest.log" "$RESULTS/pytest.log"
fi

if want bench; then
    present=()
    for name in "${BENCHMARKS[@]}"; do
        if [ -f "benchmarks/$name.py" ]; then present+=("$name"); else log "benchmarks/$name.py not present: skipped"; fi
    done
    for i in "${!present[@]}"; do
        name="${present[$i]}"
        # an equal share of the time left; the script stops starting cases 30 s before it (and writes its report),
        # timeout is the backstop
        share=$(( $(left) / (${#present[@]} - i) ))
        if [ "$share" -lt 45 ]; then log "$name: no time left (${share} s)"; FAILED+=("$name(no time)"); continue; fi
        log "$name $BENCH_ARGS (at most ${share} s)"
        # shellcheck disable=SC2086
        timeout "$share" "$PYTHON" "benchmarks/$name.py" $BENCH_ARGS --output "$RESULTS" \
            --time-budget $((share - 30)) >"$LOGS/$name.log" 2>&1
        status=$?
        [ "$status" -eq 0 ] || { FAILED+=("$name(exit $status)"); tail -20 "$LOGS/$name.log"; }
        [ -f "$RESULTS/$name.md" ] && cat "$RESULTS/$name.md"
    done
fi

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/logs" "$OUT/results"
    cp -r "$LOGS"/. "$OUT/logs/"
    cp -r "$RESULTS" "$OUT/results/"
fi
log "done; failed: ${FAILED[*]:-none}"
[ "${#FAILED[@]}" -eq 0 ]
