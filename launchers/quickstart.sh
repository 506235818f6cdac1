#!/usr/bin/env bash
# Quick start: prepare the shipped corpus, train the tiny MoSE recipe (CPU when no GPU is
# present; a few minutes on 2 cores) with TensorBoard logs, calibrate gamma for six budgets
# (on 16 batches of 6: a third of the paper's stream, to keep the quick start quick),
# and print the compute/quality table (MFLOPs/token and perplexity per mode and budget).
# Re-running resumes the same run (runs/quickstart) and redoes calibration and table. Ends with
# the next commands to try (mose-generate, TensorBoard).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launchers/setup_env.sh"
cd "$ROOT"
OUT="${OUT:-runs/quickstart}"

if [ ! -f "$OUT/data/meta.json" ]; then
  mose-prepare --input corpus/tinyshakespeare.txt --out "$OUT/data" --compact-vocab
fi
"$PY" -m mose_ds.train --config ds_configs/tiny_cpu.yaml \
  data.path="$OUT/data" logging.out_dir="$OUT" "$@"
mose-calibrate --ckpt "$OUT" --batches 16 --out "$OUT/gamma_table.yaml" --force
mose-eval sweep --ckpt "$OUT" --table "$OUT/gamma_table.yaml" --out "$OUT/pareto" --force
echo
echo "Next: source .venv/bin/activate, then"
echo "  mose-generate --ckpt $OUT --prompt \"ROMEO:\"             # text from the trained model"
echo "  tensorboard --logdir $OUT/tensorboard                     # width curves, one colour per width"
