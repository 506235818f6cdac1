#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs the pinned dependencies in the order that works:
# torch first (an unpinned torch pulls GBs of CUDA packages on CPU machines), then DeepSpeed
# without JIT-built ops, then this package. Does nothing when .venv is already up to date.
# Source it: `source launchers/setup_env.sh`; afterwards $PY is the environment's python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.mose_ds_installed"
WANT="$(cat "$ROOT/setup.py" | sha256sum | cut -c1-16)"

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "setup_env: Python 3.11 is required (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
    exit 1
  fi
  echo "setup_env: installing into $VENV (first run only; a few minutes)"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
  "${PIP[@]}" "torch==2.13.0"
  DS_BUILD_OPS=0 "${PIP[@]}" "deepspeed==0.19.8"
  "${PIP[@]}" -e "$ROOT[test]"
  echo "$WANT" > "$STAMP"
  echo "setup_env: ready ($VENV)"
fi
PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"
