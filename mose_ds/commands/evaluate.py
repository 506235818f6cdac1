#!/usr/bin/env python
"""Evaluate a MoSE checkpoint under inference-time width policies.

    mose-eval ppl     --ckpt RUN [--policy uniform --width 0.5 | --policy normprob --budget 1.0
                                     | --policy gamma --table RUN/gamma_table.yaml --budget 1.0] [--json]
    mose-eval sweep   --ckpt RUN --table RUN/gamma_table.yaml --out RUN/pareto [--json]
    mose-eval tasks   --ckpt RUN --task lambada --files lambada_test.jsonl [policy flags] [--json]
    mose-eval routing --ckpt RUN --out RUN/routing [--widths 0.25 0.5 1.0] [--json]

Data for `ppl`, `sweep` and `routing`: a prepared split (`--data DIR --split val`, default the
checkpoint's own data folder and its validation split) or a text file (`--text FILE`), read
with the tokenizer the checkpoint records (a `--data` of another tokenizer is refused).
`--top-k K` routes to K < k experts without retraining (routing transfer). Compute is reported
nominal (the paper's sum of ceil(w H) of the deployed widths) and executed (what the kernels
ran), MFLOPs/token in the paper and standard conventions (mose_ds/flops.py). With --json, stdout carries one JSON object and nothing else.

`sweep` evaluates the modes MoE-at-full-width, uniform (every grid width), normalised
probability and, with a gamma table, gamma-shared and gamma-layerwise at each budget; it
writes sweep.csv, pareto.png (perplexity vs MFLOPs/token with each mode's Pareto frontier),
reduction.png (FLOPs reduction at matched perplexity against full width and against
uniform), summary.json and TensorBoard scalars (step = kFLOPs/token, paper convention).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import sys
import time


from mose_ds.policies import add_policy_arguments

COLORS = {"full": "black", "uniform": "tab:blue", "normprob": "tab:orange",
          "gamma-shared": "tab:green", "gamma-layerwise": "tab:red", "moe": "tab:grey"}


class Failure(Exception):
    """Bad input: reported as one line, exit status 2."""


def add_common(p: argparse.ArgumentParser, data: bool = True) -> None:
    p.add_argument("--ckpt", required=True, help="a run folder, checkpoint folder, or tag folder")
    p.add_argument("--top-k", type=int, help="route to k' < k experts (routing transfer)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda or cuda:N (default: MOSE_DS_DEVICE, else cuda if torch sees a GPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    if data:
        p.add_argument("--data", help="prepared data folder (default: the checkpoint's data.path)")
        p.add_argument("--split", default="val")
        p.add_argument("--text", help="a text file instead of a prepared split")
        p.add_argument("--batches", type=int, default=16, help="batches to evaluate (default 16)")
        p.add_argument("--batch-size", type=int, help="sequences per batch (default: training micro-batch)")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="mose-eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    ppl = sub.add_parser("ppl", formatter_class=argparse.ArgumentDefaultsHelpFormatter, help="perplexity and compute under one policy")
    add_common(ppl)
    add_policy_arguments(ppl)
    sweep = sub.add_parser("sweep", formatter_class=argparse.ArgumentDefaultsHelpFormatter, help="budget sweep over the policy modes, CSV + plots + TensorBoard")
    add_common(sweep)
    sweep.add_argument("--table", help="gamma table (adds the gamma-shared / gamma-layerwise modes)")
    sweep.add_argument("--budgets", type=float, nargs="+",
                       help="budgets Gamma (default: the table's, else k x 0.25, 0.375, 0.5, 0.625, 0.75, 1)")
    sweep.add_argument("--exact-budget", action="store_true")
    sweep.add_argument("--continuous", action="store_true")
    sweep.add_argument("--baseline", help="a plain MoE checkpoint (mose.enabled: false) trained on the "
                       "same tokens: evaluated at full width and uniform 0.25 / 0.5 / 0.75 on the same batches")
    sweep.add_argument("--out", required=True, help="output folder")
    sweep.add_argument("--force", action="store_true", help="overwrite files in --out")
    tasks = sub.add_parser("tasks", formatter_class=argparse.ArgumentDefaultsHelpFormatter, help="zero-shot tasks scored as lm-evaluation-harness does")
    add_common(tasks, data=False)
    add_policy_arguments(tasks)
    tasks.add_argument("--task", required=True, help="lambada | wikitext | hellaswag | piqa | siqa | wsc273")
    tasks.add_argument("--files", nargs="+", required=True,
                       help="the task's local file(s); piqa and siqa: the jsonl then the labels file")
    tasks.add_argument("--limit", type=int, help="score only the first N items")
    tasks.add_argument("--vocab-data", help="prepared data folder, checked against the checkpoint's "
                       "tokenizer (only needed for a checkpoint that predates its tokenizer record)")
    routing = sub.add_parser("routing", formatter_class=argparse.ArgumentDefaultsHelpFormatter, help="expert-selection histograms, JS divergence, heatmaps")
    add_common(routing)
    routing.add_argument("--widths", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    routing.add_argument("--out", required=True, help="output folder")
    routing.add_argument("--force", action="store_true")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------

def load(args, path: str | None = None):
    from mose_ds.checkpoint import CheckpointError
    from mose_ds.config import ConfigError
    from mose_ds.devices import DeviceError
    from mose_ds.inference import load_model
    try:
        return load_model(path or args.ckpt, top_k=args.top_k, device=args.device)
    except (CheckpointError, ConfigError, DeviceError) as e:
        raise Failure(str(e)) from None


def eval_batches(args, loaded):
    """The evaluation batches of `--data/--split` or `--text`."""
    from mose_ds.config import ConfigError
    from mose_ds.inference import split_batches, text_windows, window_batches
    from mose_ds.tokenizer import TextCodec, check_data
    cfg = loaded.cfg
    bs = args.batch_size or cfg.train.micro_batch_size
    if args.batches < 1 or bs < 1:
        raise Failure("--batches and --batch-size must be >= 1")
    data = args.data or cfg.data.path
    try:
        if args.text:
            if not os.path.isfile(args.text):
                raise Failure(f"--text: no such file: {args.text}")
            codec = TextCodec.for_checkpoint(loaded.folder, args.data)
            with open(args.text, encoding="utf-8") as f:
                windows = text_windows(codec, f.read(), cfg.model.seq_len)
            batches = list(window_batches(windows, bs, args.batches))
            if not batches:
                raise Failure(f"--text {args.text}: fewer than one batch of {bs} windows")
            return batches, f"{args.text} ({sum(b[1].numel() for b in batches):,} tokens)"
        check_data(loaded.folder, data)
        batches = split_batches(data, args.split, cfg, bs, args.batches)
        return batches, f"{data} [{args.split}] ({sum(b[1].numel() for b in batches):,} tokens)"
    except (ConfigError, ValueError) as e:
        raise Failure(str(e)) from None


def policy_of(args, loaded, **override):
    from mose_ds.policies import PolicyError, build_policy, spec_from_arguments
    spec = spec_from_arguments(args)
    for key, value in override.items():
        setattr(spec, key, value)
    try:
        return build_policy(spec, loaded.cfg, loaded.identity), spec.label()
    except PolicyError as e:
        raise Failure(str(e)) from None


def result_row(mode: str, budget, result) -> dict:
    """One evaluated point: nominal compute (the paper's sum of ceil(w H): `mflops_*`,
    `mean_width`) beside what the kernels executed (`*_executed`)."""
    return {"mode": mode, "budget": budget, "ppl": result.ppl, "loss": result.loss,
            "mflops_paper": result.mflops["paper"], "mflops_standard": result.mflops["standard"],
            "mflops_paper_executed": result.mflops_executed["paper"],
            "mflops_standard_executed": result.mflops_executed["standard"],
            "mean_width": result.mean_width, "executed_width": result.executed_width,
            "dropped": result.dropped, "tokens": result.tokens,
            **{f"mflops_{k}": v for k, v in result.breakdown.items()}}


def check_out(folder: str, names: list[str], force: bool) -> None:
    existing = [n for n in names if os.path.exists(os.path.join(folder, n))]
    if existing and not force:
        raise Failure(f"{folder} already holds {', '.join(existing)} (pass --force to overwrite)")
    os.makedirs(folder, exist_ok=True)


# ---------------------------------------------------------------------------------------------

def cmd_ppl(args, say):
    from mose_ds.inference import evaluate_policy
    loaded = load(args)
    policy, label = policy_of(args, loaded)
    batches, source = eval_batches(args, loaded)
    r = evaluate_policy(loaded.model, batches, policy)
    say(f"{loaded.cfg.model.name} @ {loaded.folder}\n{label} on {source}\n"
        f"  perplexity {r.ppl:.3f} (loss {r.loss:.4f}) | MFLOPs/token paper {r.mflops['paper']:.4f} "
        f"(executed {r.mflops_executed['paper']:.4f}) standard {r.mflops['standard']:.4f} | mean width "
        f"{r.mean_width:.3f} (executed {r.executed_width:.3f}) | dropped {r.dropped:.2%}")
    return {"checkpoint": loaded.identity, "policy": label, "data": source, **result_row(args.policy, args.budget, r)}


def sweep_plan(args, loaded) -> list[tuple[str, float | None, dict]]:
    """(mode, budget, policy override) for every point of the sweep."""
    from mose_ds.policies import PolicyError, check_budgets, default_budgets, read_gamma_table
    cfg, k = loaded.cfg, loaded.cfg.moe.top_k
    table = None
    if args.table:
        try:
            table = read_gamma_table(args.table, loaded.identity)
        except PolicyError as e:
            raise Failure(str(e)) from None
    budgets = args.budgets
    if budgets is None:
        budgets = sorted({e["budget"] for es in table["modes"].values() for e in es}) if table else \
            default_budgets(k)
    try:
        check_budgets(budgets, k)
    except PolicyError as e:
        raise Failure(str(e)) from None
    plan = [("full", float(k), {"kind": "full"})]
    plan += [("uniform", round(w * k, 6), {"kind": "uniform", "width": w}) for w in cfg.mose.grid if w < 1]
    plan += [("normprob", b, {"kind": "normprob", "budget": b}) for b in budgets]
    if table:
        for mode in ("shared", "layerwise"):
            plan += [(f"gamma-{mode}", b, {"kind": "gamma", "budget": b, "table": args.table, "gamma_mode": mode})
                     for b in budgets if mode in table["modes"]]
    return plan


def cmd_sweep(args, say):
    from mose_ds import pareto
    from mose_ds.inference import evaluate_policy
    from mose_ds.monitor import Monitor
    loaded = load(args)
    names = ["sweep.csv", "pareto.png", "reduction.png", "summary.json"]
    check_out(args.out, names, args.force)
    batches, source = eval_batches(args, loaded)
    args.policy, args.width, args.budget, args.gamma, args.gamma_mode = "full", None, None, 1.0, "layerwise"
    plan = sweep_plan(args, loaded)
    say(f"sweep of {loaded.cfg.model.name} ({loaded.folder}) on {source}: {len(plan)} points")
    baseline = None
    if args.baseline:
        baseline = load(args, args.baseline)
        check_same_tokenizer(loaded, baseline)
        plan += [("moe", baseline.cfg.moe.top_k * w, {"kind": "full"} if w == 1 else {"kind": "uniform", "width": w})
                 for w in BASELINE_WIDTHS]
    rows, start = [], time.time()
    for i, (mode, budget, override) in enumerate(plan):
        which = baseline if mode == "moe" else loaded
        policy, label = policy_of(args, which, **override)
        r = evaluate_policy(which.model, batches, policy)
        rows.append(result_row(mode, budget, r))
        say(f"  [{i + 1}/{len(plan)}] {mode + ' ' + label if mode == 'moe' else label:28s} ppl {r.ppl:9.3f} | "
            f"{r.mflops['paper']:.4f} MFLOPs/token (executed {r.mflops_executed['paper']:.4f}) | "
            f"width {r.mean_width:.3f} | {time.time() - start:.0f}s")

    with open(os.path.join(args.out, "sweep.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {"checkpoint": loaded.identity, "data": source, "baseline": baseline.identity if baseline else None,
               **pareto.sweep_summary(rows, loaded.cfg.moe.top_k)}
    points = pareto.mode_points(rows, "mflops_paper")
    uniform_ref = points["uniform"] + points["full"]          # w = 1 closes the uniform frontier
    full_flops = points["full"][0][0]
    plot_pareto(points, os.path.join(args.out, "pareto.png"), loaded.cfg.model.name, summary["table1"])
    plot_reduction(points, uniform_ref, full_flops, os.path.join(args.out, "reduction.png"))
    monitor = Monitor(args.out, True, [])
    for r in rows:
        step = int(round(r["mflops_paper"] * 1000))
        monitor.scalars({f"sweep/{r['mode']}/ppl": r["ppl"], f"sweep/{r['mode']}/mean_width": r["mean_width"]}, step)
    monitor.close()
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)

    say(compute_quality_table(rows))
    for ref in ("uniform", "normprob"):
        for mode, s in summary[f"vs_{ref}"].items():
            executed = summary[f"vs_{ref}_executed"][mode]
            say(f"  {mode}: below the {ref} frontier at {s['below']} of {len(points[mode])} budgets "
                f"(with executed MFLOPs: {executed['below']}), above at {s['above']} ({executed['above']})")
    t1 = summary["table1"]
    if t1:
        say("  Table 1's operating point: " + "; ".join(f"{name} ppl {r['ppl']:.3f} at {r['mflops_paper']:.4f} MFLOPs/token"
                                                        for name, r in t1.items()))
    say(f"\nsweep: {len(rows)} points in {time.time() - start:.0f}s -> {os.path.abspath(args.out)}/"
        f"{{{','.join(names)}}} + TensorBoard ({monitor.path})")
    return summary


BASELINE_WIDTHS = (1.0, 0.25, 0.5, 0.75)


def check_same_tokenizer(loaded, baseline) -> None:
    """The baseline is scored on the main checkpoint's token ids: refuse one trained on others."""
    from mose_ds.tokenizer import describe, identity, read_record
    mine, theirs = read_record(loaded.folder), read_record(baseline.folder)
    if mine is not None and theirs is not None and identity(mine) != identity(theirs):
        raise Failure(f"--baseline {baseline.folder} was trained with {describe(theirs)}, but {loaded.folder} "
                      f"with {describe(mine)}: they cannot be scored on the same ids")


def compute_quality_table(rows: list[dict]) -> str:
    lines = ["", "  mode            | budget | mean width | MFLOPs/tok paper | executed | standard | perplexity",
             "  ----------------+--------+------------+------------------+----------+----------+-----------"]
    for r in rows:
        lines.append(f"  {r['mode']:15s} | {r['budget']:6.3f} | {r['mean_width']:10.3f} | "
                     f"{r['mflops_paper']:16.4f} | {r['mflops_paper_executed']:8.4f} | "
                     f"{r['mflops_standard']:8.3f} | {r['ppl']:10.3f}")
    return "\n".join(lines)


def plot_pareto(points, path, title, table1_points=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mose_ds import pareto
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, pts in points.items():
        xs, ys = zip(*pts)
        ax.scatter(xs, ys, color=COLORS[mode], s=18, alpha=0.6, marker="*" if mode == "full" else "o")
        front = pareto.frontier(pts + (points["full"] if mode == "uniform" else []))
        fx, fy = zip(*front)
        ax.plot(fx, fy, color=COLORS[mode], label="MoE baseline (not slimmable-trained)" if mode == "moe" else mode)
    for name, r in (table1_points or {}).items():
        if name != "mose_full_width":
            ttt = "ttt" in name
            ax.scatter([r["mflops_paper"]], [r["ppl"]], s=120, facecolors="none", edgecolors="black", lw=1.2)
            ax.annotate("Table 1: TTT at Gamma = k" if ttt else "Table 1: MoE", (r["mflops_paper"], r["ppl"]),
                        textcoords="offset points", xytext=(-160, 30) if ttt else (-70, 10), fontsize=8,
                        arrowprops={"arrowstyle": "-", "lw": 0.6})
    # the y range of our model's modes: a baseline point far above it is marked at the top edge
    ours = [p for mode, pts in points.items() if mode != "moe" for _, p in pts]
    top = max(ours) + 0.25 * (max(ours) - min(ours))
    ax.set_ylim(min(ours) - 0.05 * (max(ours) - min(ours)), top)
    for flops, ppl in points.get("moe", []):
        if ppl > top:
            ax.annotate(f"MoE {ppl:.1f}", (flops, top), textcoords="offset points", xytext=(3, -12),
                        fontsize=8, color=COLORS["moe"])
    ax.set_xlabel("MFLOPs / token (paper convention: sum of ceil(w H) of the deployed widths)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{title}: perplexity vs compute, Pareto frontiers")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reduction(points, uniform_ref, full_flops, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mose_ds import pareto
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, pts in points.items():
        if mode in ("full", "moe"):
            continue
        front = pareto.frontier(pts)
        left.plot([p for _, p in front], [100 * (1 - f / full_flops) for f, _ in front], "o-",
                  color=COLORS[mode], label=mode)
        if mode != "uniform":
            red = pareto.flops_reduction(pts, uniform_ref)
            if red:
                right.plot([p for p, _ in red], [100 * r for _, r in red], "o-", color=COLORS[mode], label=mode)
    left.set_title("FLOPs saved vs MoE at full width")
    right.set_title("FLOPs saved vs uniform width, at matched perplexity")
    for ax in (left, right):
        ax.set_xlabel("perplexity")
        ax.set_ylabel("FLOPs reduction (%)")
        ax.axhline(0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_tasks(args, say):
    from mose_ds.scoring import Scorer
    from mose_ds.tasks import TaskError, run_task
    from mose_ds.tokenizer import TextCodec
    from mose_ds.config import ConfigError
    loaded = load(args)
    policy, label = policy_of(args, loaded)
    try:
        codec = TextCodec.for_checkpoint(loaded.folder, args.vocab_data)
    except (ConfigError, ValueError) as e:      # a missing data folder, another tokenizer
        raise Failure(str(e)) from None
    scorer = Scorer(loaded.model, codec, policy)
    try:
        metrics = run_task(args.task, scorer, args.files, args.limit)
    except TaskError as e:
        raise Failure(str(e)) from None
    mflops = scorer.meter.mflops()
    unk = codec.unknown / max(codec.encoded, 1)
    say(f"{args.task} | {label} | " + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in metrics.items())
        + f" | MFLOPs/token paper {mflops['paper']:.4f} (executed {scorer.meter.mflops(executed=True)['paper']:.4f})"
        + f" | unknown tokens {unk:.2%}")
    return {"checkpoint": loaded.identity, "task": args.task, "policy": label, **metrics,
            "mflops_per_token": mflops, "mflops_per_token_executed": scorer.meter.mflops(executed=True),
            "unknown_token_rate": unk}


def js_divergence(p, q) -> float:
    """Jensen-Shannon divergence (natural log, in [0, ln 2]) of two histograms."""
    import torch
    p = torch.as_tensor(p, dtype=torch.float64)
    q = torch.as_tensor(q, dtype=torch.float64)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a, b):
        mask = a > 0
        return float((a[mask] * (a[mask] / b[mask]).log()).sum())
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def cmd_routing(args, say):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from mose_ds.inference import evaluate_policy
    from mose_ds.widths import UniformPolicy
    loaded = load(args)
    bad = [w for w in args.widths if not 0 < w <= 1]
    if bad:
        raise Failure(f"--widths {bad} outside (0, 1]")
    names = [f"experts_w{w:.2f}.png" for w in args.widths] + ["routing.json"]
    check_out(args.out, names, args.force)
    batches, source = eval_batches(args, loaded)
    hist = {}
    for w in args.widths:
        r = evaluate_policy(loaded.model, batches, UniformPolicy(w))
        hist[w] = np.array(r.counts)                                        # [layers, E]
        share = hist[w] / hist[w].sum(1, keepdims=True)
        fig, ax = plt.subplots(figsize=(1 + 0.5 * share.shape[1], 1 + 0.6 * share.shape[0]))
        im = ax.imshow(share, cmap="viridis", vmin=0, aspect="auto")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"expert utilisation, w={w:.2f}")
        fig.colorbar(im, ax=ax, label="share of routed choices")
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, f"experts_w{w:.2f}.png"), dpi=110)
        plt.close(fig)
    pairs = {}
    for i, a in enumerate(args.widths):
        for b in args.widths[i + 1:]:
            per_layer = [js_divergence(x, y) for x, y in zip(hist[a], hist[b])]
            pairs[f"{a:.2f}-{b:.2f}"] = {"global": js_divergence(hist[a].sum(0), hist[b].sum(0)),
                                         "per_layer": per_layer}
    out = {"checkpoint": loaded.identity, "data": source, "top_k": loaded.cfg.moe.top_k,
           "histograms": {f"{w:.2f}": hist[w].tolist() for w in args.widths}, "js_divergence": pairs}
    with open(os.path.join(args.out, "routing.json"), "w") as f:
        json.dump(out, f, indent=2)
    say(f"routing of {loaded.cfg.model.name} (k={loaded.cfg.moe.top_k}) on {source}")
    for pair, v in pairs.items():
        say(f"  JS divergence w={pair}: global {v['global']:.2e}, per layer "
            + ", ".join(f"{x:.2e}" for x in v["per_layer"]))
    say(f"routing: {len(args.widths)} heatmaps + routing.json -> {os.path.abspath(args.out)}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    command = {"ppl": cmd_ppl, "sweep": cmd_sweep, "tasks": cmd_tasks, "routing": cmd_routing}[args.command]
    try:
        # library chatter (DeepSpeed's logger binds stdout at import) goes to stderr
        with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
            from mose_ds.train import quiet_libraries
            quiet_libraries()
            result = command(args, say)
    except Failure as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
