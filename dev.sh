#!/usr/bin/env bash
# Set-up and entry points on a fresh machine with only Python >= 3.11 and pip.
#   bash dev.sh demo [args]   set up, then run `influence-ssl demo` on the embedded default
#   bash dev.sh test [args]   set up, then run the linter and the test suite
#   bash dev.sh setup         set up only (idempotent: reinstalls only when pyproject changes)
set -euo pipefail
cd "$(dirname "$0")"
VENV="${INFLUENCE_SSL_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp="$VENV/.influence-ssl-installed"
    local want
    want="$(cat pyproject.toml dev.sh | sha256sum | cut -d' ' -f1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return
    fi
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # The CPU build of torch, pinned: an unpinned torch pulls a multi-GB CUDA build.
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
    "$VENV/bin/python" -m pip install -q -e ".[test,demo]"
    echo "$want" > "$stamp"
}

cmd="${1:-}"
shift || true
case "$cmd" in
    setup) setup ;;
    demo) setup; exec "$VENV/bin/influence-ssl" demo "$@" ;;
    test)
        setup
        "$VENV/bin/ruff" check .
        exec "$VENV/bin/python" -m pytest -q "$@"
        ;;
    *) echo "usage: bash dev.sh {demo|test|setup} [args]" >&2; exit 2 ;;
esac
