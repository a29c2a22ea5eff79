#!/usr/bin/env bash
# README command one: set up ./.venv, then run the PoSE demo (scripts/demo.py; `scripts/demo.sh --help` lists its flags).
set -euo pipefail
cd "$(dirname "$0")/.."
demo_start=$(date +%s)
source scripts/setup_env.sh

# The training text: the Python 3.11 documentation sources shipped by Debian's python3.11-doc package.
DOCS=/usr/share/doc/python3.11/html/_sources
if [ ! -d "$DOCS" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "[demo] installing python3.11-doc (the training text)"
        apt-get install -y -qq python3.11-doc >/dev/null 2>&1 \
            || { apt-get update -qq && apt-get install -y -qq python3.11-doc >/dev/null; }
    else
        echo "[demo] $DOCS is missing: run 'sudo apt-get install -y python3.11-doc', or pass" \
             "--train-data/--eval-data folders of your own long text" >&2
    fi
fi
python scripts/demo.py "$@"
echo "[demo] total wall time including set-up: $(( $(date +%s) - demo_start )) s"
