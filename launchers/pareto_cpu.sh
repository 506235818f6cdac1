#!/usr/bin/env bash
# The inference-time width study on CPU (docs/pareto.md): train ds_configs/small_cpu.yaml on the
# bytes of the shipped corpus (about 23 minutes on 2 cores) and, on the same tokens, the plain MoE
# baseline (mose.enabled=false, about 12 minutes); calibrate gamma (shared and layer-wise) for the
# six default budgets on the training split (50 batches of 6, the paper's stream); sweep every
# policy mode on the held-out split beside the MoE baseline; diagnose routing across widths.
# A finished training resumes as finished, so a rerun only redoes the evaluation.
# Writes runs/small_cpu/{data,checkpoints,tensorboard,gamma_table.yaml,pareto/,routing/} and
# runs/small_cpu_moe/{checkpoints,tensorboard}.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launchers/setup_env.sh"
cd "$ROOT"
OUT="${OUT:-runs/small_cpu}"
MOE_OUT="${MOE_OUT:-${OUT}_moe}"

if [ ! -f "$OUT/data/meta.json" ]; then
  mose-prepare --input corpus/tinyshakespeare.txt --out "$OUT/data" --tokenizer bytes
fi
"$PY" -m mose_ds.train --config ds_configs/small_cpu.yaml data.path="$OUT/data" logging.out_dir="$OUT" "$@"
"$PY" -m mose_ds.train --config ds_configs/small_cpu.yaml data.path="$OUT/data" logging.out_dir="$MOE_OUT" \
  mose.enabled=false "$@"
mose-calibrate --ckpt "$OUT" --mode both --out "$OUT/gamma_table.yaml" --force
mose-eval sweep --ckpt "$OUT" --table "$OUT/gamma_table.yaml" --baseline "$MOE_OUT" --batches 27 \
  --out "$OUT/pareto" --force
mose-eval routing --ckpt "$OUT" --out "$OUT/routing" --force
