#!/usr/bin/env bash
# The inference-time width study on CPU (docs/pareto.md): train ds_configs/small_cpu.yaml on the
# bytes of the shipped corpus (about 23 minutes on 2 cores), calibrate gamma (shared and
# layer-wise) for five budgets on its training split, sweep every policy mode on its held-out
# split and diagnose routing across widths (about 31 minutes in all).
# Writes runs/small_cpu/{data,checkpoints,tensorboard,gamma_table.yaml,pareto/,routing/}.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launchers/setup_env.sh"
cd "$ROOT"
OUT="${OUT:-runs/small_cpu}"

if [ ! -f "$OUT/data/meta.json" ]; then
  "$PY" tools/prepare_data.py --input corpus/tinyshakespeare.txt --out "$OUT/data" --tokenizer bytes
fi
"$PY" -m mose_ds.train --config ds_configs/small_cpu.yaml data.path="$OUT/data" logging.out_dir="$OUT" "$@"
"$PY" tools/calibrate_gamma.py --ckpt "$OUT" --mode both --out "$OUT/gamma_table.yaml" --force
"$PY" tools/evaluate.py sweep --ckpt "$OUT" --table "$OUT/gamma_table.yaml" --batches 27 \
  --out "$OUT/pareto" --force
"$PY" tools/evaluate.py routing --ckpt "$OUT" --out "$OUT/routing" --force
