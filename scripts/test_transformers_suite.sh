#!/usr/bin/env bash
# transformers' own common model tests, stock and then under `import ctxext_kernels`, for every patched family; fails
# when a test that passes stock fails patched. The tests come from the installed transformers version's sdist (its
# top-level tests/*.py: ModelTesterMixin in test_modeling_common.py), downloaded once into .cache/; the per-family
# tester is scripts/transformers_suite/test_ctxext_families.py. The generation and export mixins (tests/generation,
# tests/exporters) are not in the sdist and are left out.
# Usage: scripts/test_transformers_suite.sh [pytest args, e.g. -k "Llama and rope"]
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
trap 'rm -rf "$WORK"' EXIT
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
        PYTHONPATH="$ROOT:$WORK${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=1 \
        "$PY" -m pytest tests/test_ctxext_families.py -q -p no:cacheprovider --junitxml="$WORK/$mode.xml" "$@" \
        >"$WORK/$mode.log" 2>&1) || true
    tail -n 1 "$WORK/$mode.log"
}
run stock "$@"
run patched "$@"

"$PY" - "$WORK/stock.xml" "$WORK/patched.xml" <<'EOF'
"""Outcome per test id in each run; fail on any test that passes stock and not patched."""
import sys
import xml.etree.ElementTree as ET


def outcomes(path):
    result = {}
    for case in ET.parse(path).iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        tags = {child.tag for child in case}
        result[name] = ("failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed")
    return result


stock, patched = outcomes(sys.argv[1]), outcomes(sys.argv[2])
for label, run in (("stock", stock), ("patched", patched)):
    counts = {state: sum(1 for s in run.values() if s == state) for state in ("passed", "failed", "skipped")}
    print(f"[suite] {label}: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
patch_state = [name for name in stock if name.endswith("test_ctxext_patch_state")]
regressions = sorted(name for name, state in stock.items()
                     if state == "passed" and patched.get(name) != "passed" and name not in patch_state)
for name in regressions:
    print(f"[suite] REGRESSION: {name} passes stock, {patched.get(name, 'missing')} patched")
broken_runs = [name for name in patch_state if stock[name] != "passed" or patched.get(name) != "passed"]
for name in broken_runs:
    print(f"[suite] the run was not stock/patched as intended: {name}")
sys.exit(1 if regressions or broken_runs or not stock else 0)
EOF
