#!/usr/bin/env bash
# Quick start: prepare the shipped corpus, train the tiny MoSE recipe (CPU when no GPU is
# present; a few minutes on 2 cores) with TensorBoard logs, and print the width-wise
# validation table. Re-running resumes the same run (runs/quickstart).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launchers/setup_env.sh"
cd "$ROOT"
OUT="${OUT:-runs/quickstart}"

if [ ! -f "$OUT/data/meta.json" ]; then
  "$PY" tools/prepare_data.py --input corpus/tinyshakespeare.txt --out "$OUT/data" --compact-vocab
fi
"$PY" -m mose_ds.train --config ds_configs/tiny_cpu.yaml \
  data.path="$OUT/data" logging.out_dir="$OUT" "$@"
