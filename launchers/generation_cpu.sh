#!/usr/bin/env bash
# Self-speculative decoding measured on CPU (docs/generation.md), after launchers/quickstart.sh
# and launchers/pareto_cpu.sh have trained their models:
#   1. plain against self-speculative greedy decoding, full-width target, draft widths
#      0.25 / 0.5 / 0.75 x N = 2 / 4 / 8, on held-out prompts, for both trained models;
#   2. the per-step costs of GPT-2 MoSE models of growing size (random weights): where a narrow
#      draft starts to pay, with the trained models' acceptance rates;
#   3. the per-step costs of the 16B recipe's layer shape (DeepSeek-V2-Lite, random weights) and
#      the speed-up predicted there.
# Writes runs/generation/{compare_quickstart,compare_small_cpu,compare_small_cpu_top1,scan_cpu,
# shape_cpu}.json. About 25 minutes on 2 cores; run it on an otherwise idle machine (timings).
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
ACC=("$OUT/compare_quickstart.json" "$OUT/compare_small_cpu.json")
"${BENCH[@]}" scan --hidden 128 256 512 1024 2048 --acceptance "${ACC[@]}" --out "$OUT/scan_cpu.json"
"${BENCH[@]}" shape --context 512 --acceptance "${ACC[@]}" --out "$OUT/shape_cpu.json"
