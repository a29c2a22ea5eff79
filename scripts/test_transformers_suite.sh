#!/usr/bin/env bash
# transformers' own common model tests, stock and then under `import ctxext_kernels`, for every patched family; fails
# when a test that passes stock fails patched. The tests come from the installed transformers version's sdist (its
# top-level tests/*.py: ModelTesterMixin in test_modeling_common.py), downloaded once into .cache/; the per-family
# tester is scripts/transformers_suite/test_ctxext_families.py. The generation and export mixins (tests/generation,
# tests/exporters) are not in the sdist and are left out.
# Usage: scripts/test_transformers_suite.sh [pytest args, e.g. -k "Llama and rope"]
# CTXEXT_SUITE_ATTN=ctxext: the patched run's models use attn_implementation="ctxext" (the stock run keeps transformers'
# default), so a regression is then a test the fused attention backend fails that stock attention passes.
# PYTHON picks the interpreter (default: ./.venv/bin/python, as scripts/test.sh sets it up).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${PYTHON:-$ROOT/.venv/bin/python}"

VERSION="$("$PY" -c 'import transformers; print(transformers.__version__)')"
CACHE="$ROOT/.cache/transformers-tests-$VERSION"
if [ ! -f "$CACHE/tests/test_modeling_common.py" ]; then
    echo "[suite] fetching the transformers $VERSION sdist for its tests"
    rm -rf "$CACHE" && mkdir -p "$CACHE"
    "$PY" -m pip download -q --no-deps --no-binary :all: "transformers==$VERSION" -d "$CACHE"
    tar -xzf "$CACHE"/transformers-*.tar.gz -C "$CACHE" --strip-components=1 --wildcards '*/tests/*.py'
fi
"$PY" -c "import parameterized" 2>/dev/null || "$PY" -m pip install -q parameterized

WORK="$(mktemp -d)"
# CTXEXT_SUITE_LOGS=<dir> keeps the two pytest logs (stock.log, patched.log) there.
trap '[ -n "${CTXEXT_SUITE_LOGS:-}" ] && mkdir -p "$CTXEXT_SUITE_LOGS" && cp "$WORK"/*.log "$CTXEXT_SUITE_LOGS"/; rm -rf "$WORK"' EXIT
mkdir -p "$WORK/tests/generation" "$WORK/tests/exporters"
cp "$CACHE"/tests/*.py "$WORK/tests/"
touch "$WORK/tests/__init__.py" "$WORK/tests/generation/__init__.py" "$WORK/tests/exporters/__init__.py"
echo 'class GenerationTesterMixin: """Not in the sdist: no generate() tests."""' \
    >"$WORK/tests/generation/test_utils.py"
echo 'class ExportTesterMixin: """Not in the sdist: no torch.export tests."""' > "$WORK/tests/exporters/test_export.py"
cp scripts/transformers_suite/conftest.py "$WORK/"
cp scripts/transformers_suite/test_ctxext_families.py "$WORK/tests/"

run() {  # run stock|patched [pytest args]
    local mode="$1"
    shift
    echo "[suite] $mode"
    (cd "$WORK" && CTXEXT_SUITE_PATCHED="$([ "$mode" = patched ] && echo 1 || echo 0)" \
        CTXEXT_SUITE_ATTN="$([ "$mode" = patched ] && echo "${CTXEXT_SUITE_ATTN:-}")" \
        PYTHONPATH="$ROOT:$WORK${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=1 \
        "$PY" -m pytest tests/test_ctxext_families.py -q -rA -p no:cacheprovider "$@" >"$WORK/$mode.log" 2>&1) || true
    tail -n 1 "$WORK/$mode.log"
}
run stock "$@"
run patched "$@"

"$PY" - "$WORK/stock.log" "$WORK/patched.log" "${CTXEXT_SUITE_ATTN:-}" <<'EOF'
"""Fail on any test that passes stock and not patched (pytest -rA prints one PASSED/FAILED/ERROR line per test and
one SUBFAILED line per failed subtest, e.g. per model class)."""
import re
import sys

# With attn_implementation="ctxext", the tests that cannot pass by design, and why.
EXPECTED_WITH_CTXEXT = {
    # output_attentions=True: ctxext refuses it with a named error (it never materialises the attention weights);
    # transformers' own config refuses output_attentions for every backend but eager.
    "test_model_outputs_equivalence": "asks for output_attentions",
    "test_retain_grad_hidden_states_attentions": "asks for output_attentions",
    "test_capture_outputs_decorator": "asks for output_attentions",
    # checks that a plain from_pretrained picks sdpa; this run loads every model with attn_implementation="ctxext"
    "test_sdpa_can_dispatch_non_composite_models": "checks the default backend is sdpa",
}
# Whole families: Gemma 2 soft-caps its attention logits, which ctxext refuses with a named error (as sdpa does).
EXPECTED_FAMILIES_WITH_CTXEXT = {"Gemma2CtxextTest": "soft-capped attention logits"}


def outcomes(path):
    found = {}
    for line in open(path).read().splitlines():
        if match := re.match(r"(PASSED|FAILED|ERROR) (\S+)", line):
            found.setdefault(match[2], match[1])
        elif match := re.match(r"SUBFAILED\S* (\S+)", line):
            found[match[1]] = "SUBFAILED"
    return found


stock, patched = outcomes(sys.argv[1]), outcomes(sys.argv[2])
ctxext = sys.argv[3] == "ctxext"


def why_expected(name):
    """Why a test may fail patched by design, or None."""
    family, test = name.split("::")[-2:]
    if ctxext:
        return EXPECTED_FAMILIES_WITH_CTXEXT.get(family) or EXPECTED_WITH_CTXEXT.get(test)
    return None


regressions, excused = [], []
for name, state in sorted(stock.items()):
    if state == "PASSED" and patched.get(name) != "PASSED" and not name.endswith("test_ctxext_patch_state"):
        (excused if why_expected(name) else regressions).append(name)
for name in excused:
    print(f"[suite] expected: {name} {patched.get(name, 'missing')} ({why_expected(name)})")
for name in regressions:
    print(f"[suite] REGRESSION: {name} passes stock, {patched.get(name, 'missing')} patched")
state_checks = [name for name in stock if name.endswith("test_ctxext_patch_state")]
wrong_mode = [name for name in state_checks if stock[name] != "PASSED" or patched.get(name) != "PASSED"]
for name in wrong_mode:
    print(f"[suite] the run was not stock/patched as intended: {name}")
print(f"[suite] {len(stock)} tests passed or failed stock, {len(regressions)} of them not patched"
      + (f" ({len(excused)} more by design)" if excused else ""))
sys.exit(1 if regressions or wrong_mode or not state_checks else 0)
EOF
