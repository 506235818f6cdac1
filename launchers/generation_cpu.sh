#!/usr/bin/env bash
# Self-speculative decoding measured on CPU (docs/generation.md), after launchers/quickstart.sh
# and launchers/pareto_cpu.sh have trained their models (this script trains the third):
#   1. plain against self-speculative greedy decoding, full-width target, draft widths
#      0.25 / 0.5 / 0.75 x N = 2 / 4 / 8, on held-out prompts, for both trained models, one
#      prompt at a time;
#   2. the same for ds_configs/medium_cpu.yaml (trained here if absent, ~26 minutes), a batch
#      of 8 prompts at a time and one at a time;
#   3. the per-step costs of GPT-2 MoSE models of growing size (random weights), one row and 8
#      rows per step: where a narrow draft starts to pay, with the trained models' acceptance;
#   4. the per-step costs of the 16B recipe's layer shape (DeepSeek-V2-Lite, random weights) and
#      the speed-up predicted there.
# Writes runs/generation/{compare_quickstart,compare_small_cpu,compare_small_cpu_top1,
# compare_medium_b8,compare_medium_b1,scan_cpu,scan_cpu_b8,shape_cpu}.json. About 70 minutes on 2
# cores after the training; run it on an otherwise idle machine (timings).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launchers/setup_env.sh"
cd "$ROOT"
OUT="${OUT:-runs/generation}"
BENCH=("$PY" -m mose_ds.generation_bench)
"${BENCH[@]}" compare --ckpt runs/quickstart --prompts 8 --prompt-tokens 32 --max-new-tokens 64 \
  --out "$OUT/compare_quickstart.json"
"${BENCH[@]}" compare --ckpt runs/small_cpu --prompts 8 --prompt-tokens 64 --max-new-tokens 128 \
  --out "$OUT/compare_small_cpu.json"
"${BENCH[@]}" compare --ckpt runs/small_cpu --prompts 8 --prompt-tokens 64 --max-new-tokens 128 \
  --draft-top-k 1 --widths 0.25 0.5 1.0 --lengths 2 4 --out "$OUT/compare_small_cpu_top1.json"
if [ ! -f runs/medium_cpu/checkpoints/latest ]; then
  [ -f runs/medium_cpu/data/meta.json ] || mose-prepare --input corpus/tinyshakespeare.txt \
    --out runs/medium_cpu/data --tokenizer bytes
  "$PY" -m mose_ds.train --config ds_configs/medium_cpu.yaml
fi
"${BENCH[@]}" compare --ckpt runs/medium_cpu --prompts 16 --prompt-tokens 64 --max-new-tokens 128 --batch 8 \
  --lengths 2 4 --out "$OUT/compare_medium_b8.json"
"${BENCH[@]}" compare --ckpt runs/medium_cpu --prompts 8 --prompt-tokens 64 --max-new-tokens 128 \
  --lengths 2 4 --out "$OUT/compare_medium_b1.json"
ACC=("$OUT/compare_quickstart.json" "$OUT/compare_small_cpu.json")
"${BENCH[@]}" scan --hidden 128 256 512 1024 2048 --acceptance "${ACC[@]}" --out "$OUT/scan_cpu.json"
"${BENCH[@]}" scan --hidden 128 256 384 512 768 --moe-every 1 --batch 8 --lengths 2 4 --acceptance "${ACC[@]}" \
  --out "$OUT/scan_cpu_b8.json"
"${BENCH[@]}" shape --context 512 --acceptance "${ACC[@]}" --out "$OUT/shape_cpu.json"
