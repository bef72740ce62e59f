#!/usr/bin/env bash
# One entry point for a fresh machine (Python >= 3.11 and pip, nothing else).
#   bash run.sh demo   synthetic scene -> ingest -> train -> predict -> evaluate -> export
#   bash run.sh test   the test suite
# Both create .venv on first use (CPU build of torch unless a GPU is visible) and
# are idempotent: the install step is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${TILEFUSE_VENV:-.venv}

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV"
    fi
    local stamp="$VENV/.tilefuse-installed" want
    want=$(cat pyproject.toml run.sh | "$VENV/bin/python" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return
    fi
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "$VENV/bin/python" -m pip install --quiet -e ".[test,gpu]"
    else
        # CPU machine: take the CPU build first so nothing below pulls CUDA wheels.
        "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
        "$VENV/bin/python" -m pip install --quiet -e ".[test]"
    fi
    echo "$want" > "$stamp"
}

cmd=${1:-}
shift || true
case "$cmd" in
    demo)
        setup
        exec "$VENV/bin/tilefuse" demo "${@:-demo-output}"
        ;;
    test)
        setup
        exec "$VENV/bin/python" -m pytest -q "$@"
        ;;
    setup)
        setup
        ;;
    *)
        echo "usage: bash run.sh demo [OUT_DIR] | test [PYTEST_ARGS...] | setup" >&2
        exit 2
        ;;
esac
