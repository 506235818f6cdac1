#!/usr/bin/env python
"""Offline gamma calibration: learn the width-policy sharpness gamma for a list of budgets.

    mose-calibrate --ckpt runs/quickstart --budgets 0.5 0.75 1.0 1.25 1.5 [--mode both]
    mose-calibrate --ckpt runs/x/checkpoints/iter_00010000 --mode shared \
        --data data/owt --split train --batches 50 --batch-size 6 --out gamma.yaml
    mose-calibrate --ckpt RUN --method sgd --lr 0.01      # the paper's optimiser

Loads a training checkpoint (any ZeRO stage, any expert-parallel layout) into one process,
freezes every weight (checked before and after: the weights' digest must not change), and
for each budget Gamma and each mode (one gamma per MoE layer, the default, or one shared by
all layers) learns gamma on the calibration stream (50 batches of 6 by default, the paper's):
by direct search on the loss of the hard deployed widths (`--method search`, the default), or
with the paper's SGD on log gamma over the relaxation (`--method sgd`); see `mose_ds.calibrate`.
Writes a gamma table (YAML) with the checkpoint's identity, the deployment settings, and per
budget the learned gammas, the calibration loss at gamma = 1 and at the learned gammas (with
the relaxation and with hard deployed widths), and the MFLOPs/token of those widths, nominal
(the paper's count) and executed. `mose-eval --policy gamma` deploys it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import numpy as np


RELAXATION = ("soft prefix mask: hidden unit j weighted clamp(w*H - j, 0, 1) (loss_relaxed, and the "
              "objective of --method sgd); deployed widths are hard slices ceil(w*H) (loss_hard, the "
              "objective of --method search)")


def fail(msg: str) -> int:
    print(f"calibrate_gamma: error: {msg}", file=sys.stderr)
    return 2


def calibration_batches(args, cfg, folder: str):
    """`--batches` batches of `--batch-size` windows: sampled (seeded) from a prepared split,
    or read in order from a text file, in the tokenizer of checkpoint `folder` (a `--data`
    of another tokenizer is refused)."""
    import torch
    from mose_ds.data import TokenSplit
    from mose_ds.inference import text_windows
    from mose_ds.tokenizer import TextCodec, check_data
    S, n = cfg.model.seq_len, args.batches * args.batch_size
    if args.text:
        if not os.path.isfile(args.text):
            raise FileNotFoundError(f"--text: no such file: {args.text}")
        with open(args.text, encoding="utf-8") as f:
            windows = text_windows(TextCodec.for_checkpoint(folder, args.data), f.read(), S)
        if len(windows) < n:
            raise ValueError(f"--text {args.text}: {len(windows)} windows of {S + 1} tokens, "
                             f"fewer than --batches x --batch-size = {n}")
        rows = windows[:n]
    else:
        data = args.data or cfg.data.path
        check_data(folder, data)
        split = TokenSplit(data, args.split, S, cfg.model.vocab_size)
        ids = np.random.default_rng(args.seed).permutation(split.num_windows)[:n]
        if len(ids) < n:
            raise ValueError(f"--data {data} ({args.split}): {split.num_windows} windows, fewer than "
                             f"--batches x --batch-size = {n}")
        rows = np.stack([split.tokens[i * S: i * S + S + 1] for i in ids]).astype(np.int64)
    data = torch.from_numpy(rows).view(args.batches, args.batch_size, S + 1)
    return [(b[:, :-1], b[:, 1:]) for b in data]


def describe(args) -> str:
    if args.method == "search":
        return "direct search on the hard deployed loss (log-gamma scan, golden section, coordinate search)"
    return f"SGD on log(gamma), lr {args.lr}, token losses {args.reduction}, one step per batch"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mose-calibrate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a run folder, checkpoint folder, or tag folder")
    p.add_argument("--budgets", type=float, nargs="+", help="per-token budgets Gamma in (0, k] "
                   "(default: k x 0.25, 0.375, 0.5, 0.625, 0.75)")
    p.add_argument("--mode", choices=["shared", "layerwise", "both"], default="layerwise",
                   help="one gamma per MoE layer (default), one shared by all layers, or both")
    p.add_argument("--data", help="prepared data folder for the calibration stream "
                   "(default: the checkpoint's data.path)")
    p.add_argument("--split", default="train", help="split of --data (default: train)")
    p.add_argument("--text", help="calibrate on a text file instead of a prepared split")
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=6)
    p.add_argument("--method", choices=["search", "sgd"], default="search",
                   help="search: direct search on the hard deployed loss (default); sgd: the paper's SGD "
                   "on log gamma over the relaxation, one step per batch")
    p.add_argument("--lr", type=float, default=0.01, help="--method sgd: learning rate (default 0.01)")
    p.add_argument("--reduction", choices=["mean", "sum"], default="mean",
                   help="--method sgd: the batch's token losses averaged (default) or summed")
    p.add_argument("--seed", type=int, default=0, help="which windows of the split are sampled")
    p.add_argument("--exact-budget", action="store_true",
                   help="redistribute clipped width so each token's widths sum to Gamma")
    p.add_argument("--continuous", action="store_true",
                   help="deploy continuous widths instead of rounding them to the training grid")
    p.add_argument("--top-k", type=int, help="route to k' < k experts (routing transfer)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda or cuda:N (default: MOSE_DS_DEVICE, else cuda if torch sees a GPU)")
    p.add_argument("--out", help="gamma table path (default: <run folder>/gamma_table.yaml)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    args = p.parse_args(argv)
    if args.batches < 1 or args.batch_size < 1 or args.lr <= 0:
        return fail("--batches and --batch-size must be >= 1 and --lr > 0")

    with contextlib.redirect_stdout(sys.stderr):
        from mose_ds.train import quiet_libraries
        quiet_libraries()
        from tqdm import tqdm

        from mose_ds.calibrate import MODES, PolicySettings, SearchMethod, SGDMethod, WeightsChanged, calibrate, freeze
        from mose_ds.checkpoint import CheckpointError
        from mose_ds.config import ConfigError
        from mose_ds.devices import DeviceError
        from mose_ds.inference import load_model, weights_digest
        from mose_ds.policies import PolicyError, check_budgets, default_budgets, gamma_table, write_gamma_table
    start = time.time()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            loaded = load_model(args.ckpt, top_k=args.top_k, device=args.device)
    except (CheckpointError, ConfigError, DeviceError) as e:
        return fail(str(e))
    cfg, model = loaded.cfg, loaded.model
    k = cfg.moe.top_k
    budgets = args.budgets or default_budgets(k)
    try:
        check_budgets(budgets, k)
    except PolicyError as e:
        return fail(str(e))
    run_folder = os.path.dirname(os.path.dirname(loaded.folder))
    out = args.out or os.path.join(run_folder, "gamma_table.yaml")
    if os.path.exists(out) and not args.force:
        return fail(f"{out} exists (pass --force to overwrite, or --out elsewhere)")
    try:
        batches = calibration_batches(args, cfg, loaded.folder)
    except (FileNotFoundError, ValueError, ConfigError) as e:
        return fail(str(e))

    settings = PolicySettings(wmin=cfg.mose.width_min, wmax=cfg.mose.width_max,
                              exact_budget=args.exact_budget,
                              grid=None if args.continuous else cfg.mose.grid)
    digest = freeze(model)
    method = SearchMethod() if args.method == "search" else SGDMethod(args.lr, args.reduction)
    modes = MODES if args.mode == "both" else (args.mode,)
    results = {mode: [] for mode in modes}
    jobs = [(mode, b) for mode in modes for b in budgets]
    print(f"calibrating {cfg.model.name} ({loaded.folder}) on {len(batches)} x {args.batch_size} x "
          f"{cfg.model.seq_len} tokens: {len(jobs)} runs, {describe(args)}, {next(model.parameters()).device}",
          file=sys.stderr)
    for i, (mode, budget) in enumerate(jobs):
        bar = tqdm(total=len(batches) if args.method == "sgd" else None, unit="step" if args.method == "sgd" else "eval",
                   desc=f"[{i + 1}/{len(jobs)}] {mode} Gamma={budget:g}",
                   file=sys.stderr, leave=False, dynamic_ncols=True)

        def on_step(step, loss, bar=bar):
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}")

        shared = next((r.gamma for r in results.get("shared", []) if r.budget == budget), None)
        begin = shared if mode == "layerwise" and args.method == "search" else None   # same stream, same budget
        results[mode].append(calibrate(model, batches, budget, mode, settings, method, on_step, begin))
        bar.close()
    if weights_digest(model) != digest:
        raise WeightsChanged("model weights changed during calibration")

    write_gamma_table(out, gamma_table(
        loaded.identity, k, RELAXATION,
        {"wmin": settings.wmin, "wmax": settings.wmax, "exact_budget": settings.exact_budget,
         "round_to_grid": settings.grid is not None},
        {"data": os.path.abspath(args.text or args.data or cfg.data.path), "split": None if args.text else args.split,
         "batches": args.batches, "batch_size": args.batch_size, "seq_len": cfg.model.seq_len,
         "method": describe(args), "seed": args.seed}, results))

    print("\n  mode      | budget | gamma                  | loss hard (gamma=1) | relaxed (gamma=1)  "
          "| MFLOPs/tok paper (executed) | width")
    print("  ----------+--------+------------------------+---------------------+--------------------"
          "+-----------------------------+------")
    for mode, rs in results.items():
        for r in rs:
            g = ", ".join(f"{x:.3f}" for x in (r.gamma[:1] if mode == "shared" else r.gamma))
            print(f"  {mode:9s} | {r.budget:6.3f} | {g:22.22s} | {r.loss_hard:.4f} ({r.loss_hard_at_1:.4f})  | "
                  f"{r.loss_relaxed:.4f} ({r.loss_relaxed_at_1:.4f}) | {r.hard.mflops['paper']:.4f} "
                  f"({r.hard.mflops_executed['paper']:.4f})     | {r.hard.mean_width:.3f}")
    print(f"\ncalibrate_gamma: {len(jobs)} runs in {time.time() - start:.0f}s, weights unchanged "
          f"(sha256 {digest[:12]}) -> {os.path.abspath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
