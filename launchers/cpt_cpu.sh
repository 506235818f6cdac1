#!/usr/bin/env bash
# Continual pre-training on CPU, end to end (docs/deepseek.md): pre-train the tiny DeepSeek-V2
# as plain MoE (the stand-in for a released checkpoint), export it to an HF directory, convert
# that back as a CPT starting point, and run the two-pass CPT recipe from it. Prints the
# validation loss per width at the start and end of CPT.
# Writes runs/cpt_cpu/{data,base,hf-base,mose-init,cpt,hf-cpt}; extra arguments go to the CPT run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launchers/setup_env.sh"
cd "$ROOT"
OUT="${OUT:-runs/cpt_cpu}"

if [ ! -f "$OUT/data/meta.json" ]; then   # the ids the tiny config (vocab 11,776) was sized for
  mose-prepare --input corpus/tinyshakespeare.txt --out "$OUT/data" --compact-vocab
fi
"$PY" -m mose_ds.train --config ds_configs/deepseek_tiny_base_cpu.yaml data.path="$OUT/data" \
  logging.out_dir="$OUT/base"
mose-export-hf --ckpt "$OUT/base" --out "$OUT/hf-base" --overwrite
mose-convert-hf --hf "$OUT/hf-base" --out "$OUT/mose-init" --seq-len 128 --overwrite
"$PY" -m mose_ds.train --config ds_configs/deepseek_tiny_cpt_cpu.yaml data.path="$OUT/data" \
  logging.out_dir="$OUT/cpt" checkpoint.init_from="$OUT/mose-init" "$@"
mose-export-hf --ckpt "$OUT/cpt" --out "$OUT/hf-cpt" --overwrite
