#!/usr/bin/env bash
# The whole test suite (CPU; multi-rank tests start real gloo ranks). Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launchers/setup_env.sh"
cd "$ROOT"
exec "$PY" -m pytest -q -p no:cacheprovider "$@"   # pytest.ini: testpaths = tests
