#!/usr/bin/env python
"""MoE-layer and training-step benchmark against the baselines, all ratios measured in one run.

MoE layer, forward + backward on --tokens tokens (from a fixed output gradient: the layer is
timed, not a loss):
  (a) deepspeed.moe.layer.MoE with a plain FFN expert at full width, same shapes and capacity
  (b) ours at full width
  (c) ours at uniform widths (--widths)
  (d) ours with per-token widths from the normalised-probability policy (--budgets)
  (e) masking: every slot computes all H hidden units and those past its width are zeroed
      (the per-token widths of (d))
  (f) (b) and (d) with the other expert kernel (`moe.expert_kernel`: the per-expert loop or
      the grouped products; (b)-(d) use --kernel, by default what `auto` picks here)
  (g) (d) with (b)-(d)'s kernel limited to 8 hidden-unit ranges instead of 16 (one per grid
      width): what executing grid-rounded widths exactly costs in time
For each: median time (variants interleaved), and for (c)-(g) the time over (b)'s (median of
per-round ratios) next to the nominal and executed widths and the counted FLOPs ratio, and
for (f) and (g) the time over the same policy's with (b)-(d)'s kernel; host syncs and aten operations of one
forward + backward (`mose_ds/counters.py`); peak memory of each variant in a fresh process,
and of (b) at each of --memory-tokens (how memory grows with tokens).
Training step: a two-pass step (full + width w) over a single full-width step, next to the
ratio predicted from FLOPs.
Counters: host syncs and aten operations of our layer at --experts and 64 experts with each
kernel, and host syncs of a training iteration by place (MoE layers, training loop,
DeepSpeed); all-to-all bytes of a forward + backward on 2 expert-parallel gloo ranks, with
capacity and dropless, against the payload minimum (kept rows).

    mose-bench moe                               # CPU acceptance shapes
    mose-bench moe --json > bench.json
    mose-bench moe --dtype bf16 --hidden 2048 --experts 64 --top-k 8 --tokens 32768 --budgets 2,4,6 \\
        --memory-tokens 32768,131072 --recipe ds_configs/gpt2_small_e8a2.yaml --seq-len 1024 --micro-batch 8   # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository
from mose_ds import measure  # noqa: E402
from mose_ds.config import from_dict, load_config, to_dict  # noqa: E402
from mose_ds import grouped  # noqa: E402

# Dense bf16 peak TFLOP/s by device name, for utilisation figures (override: --peak-tflops).
# GB200 before B200: the first name contained in the device's wins.
PEAK_BF16_TFLOPS = {"GB200": 2500.0, "B200": 2250.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


def masked_kernel(experts, rows) -> tuple[torch.Tensor, int, None]:
    """(e): the masking implementation of per-token widths, as an expert kernel: every row
    computes all H hidden units, the units past its own size multiplied by zero."""
    outs, H = [], experts[0].ffn_hidden_size
    parts = rows.rows_per_expert()
    for expert, x_nD, m_n in zip(experts, rows.x().split(parts), rows.m_N.split(parts)):
        mask_nH = (torch.arange(H, device=x_nD.device) < m_n[:, None]).to(x_nD.dtype)
        outs.append((expert.hidden(x_nD, 0, H) * mask_nH) @ expert.w_down)
    return torch.cat(outs), rows.m_N.shape[0] * H, None


def layer_class(kernel=None):
    """Our MoE layer class, or a subclass that always runs `kernel` ((e)'s masking, (g)'s
    8 ranges) (imported here: importing DeepSpeed prints to stdout, which must stay clean
    under --json)."""
    from mose_ds.moe_layer import SlimmableMoE
    if kernel is None:
        return SlimmableMoE

    class FixedKernelMoE(SlimmableMoE):
        def expert_kernel(self, x, relaxed):
            return kernel
    return FixedKernelMoE


def fewer_ranges(args, device, dtype):
    """(g): the kernel of (b)-(d) limited to 8 hidden-unit ranges (buckets), as it was before
    one range per grid width (16): what exact grid widths cost in time."""
    from mose_ds.experts import LoopKernel
    return grouped.GroupedKernel(8) if kernels(args)[0] == "grouped" else LoopKernel(8)


# ---------------------------------------------------------------------------------------
# variants


def variant_names(args) -> list[str]:
    names = (["deepspeed", "full"] + [f"uniform_{w:g}" for w in args.widths]
             + [f"normprob_{g:g}" for g in args.budgets] + [f"masked_{g:g}" for g in args.budgets]
             + [f"ranges8_normprob_{g:g}" for g in args.budgets])
    other = kernels(args)[1]
    return names + ([f"{other}_full"] + [f"{other}_normprob_{g:g}" for g in args.budgets] if other else [])


def kernels(args) -> tuple[str, str | None]:
    """The expert kernel of (b)-(d) (--kernel, `auto` resolved for this device and dtype) and
    that of (f), the other one (None when the shapes allow only the loop)."""
    from mose_ds.engine import device
    if not grouped.supported(args.hidden, 4 * args.hidden):
        return "loop", None
    used = args.kernel
    if used == "auto":
        used = "grouped" if grouped.auto_picks_grouped(device(), DTYPES[args.dtype], args.hidden,
                                                       4 * args.hidden) else "loop"
    return used, "loop" if used == "grouped" else "grouped"


def build_layer(args, kind: str, device, dtype):
    """One MoE layer with seeded weights: DeepSpeed's, or ours ('ours' with the kernel of
    (b)-(d), 'other' with (f)'s, 'masked')."""
    from deepspeed.moe.layer import MoE
    if kind != "deepspeed":
        kernel = kernels(args)[kind == "other"] if kind in ("ours", "other") else "loop"
        fixed = {"masked": masked_kernel, "ranges8": fewer_ranges(args, device, dtype)}.get(kind)
        return our_layer(args, kernel, device, dtype, fixed)
    D, H, moe = args.hidden, 4 * args.hidden, layer_config(args, "loop").moe
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(D, H, bias=False), torch.nn.GELU(), torch.nn.Linear(H, D, bias=False))
    layer = MoE(D, plain, num_experts=args.experts, ep_size=1, k=args.top_k, capacity_factor=moe.capacity_factor,
                eval_capacity_factor=moe.eval_capacity_factor, min_capacity=moe.min_capacity)
    return seeded(layer, device, dtype)


def our_layer(args, kernel: str, device, dtype, fixed=None, **moe):
    """Our layer (always running kernel `fixed` if given) at the benchmark's shapes with
    seeded weights; `moe`: more moe keys."""
    from mose_ds.model import transformer_config
    cfg = layer_config(args, kernel, **moe)
    torch.manual_seed(0)
    layer = layer_class(fixed)(transformer_config(cfg.model), cfg.moe, cfg.model.ffn_hidden_size, "gelu", 0)
    return seeded(layer, device, dtype)


def seeded(layer, device, dtype):
    """The layer with DeepSpeed's groups, normal(0.02) weights, on the device, training."""
    layer.set_deepspeed_parallelism()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return layer.to(device=device, dtype=dtype).train()


def layer_config(args, kernel: str, **moe):
    """The run config of our layer at the benchmark's shapes (moe: more `moe` keys)."""
    return from_dict({"model": {"hidden_size": args.hidden, "num_heads": 1, "num_layers": 1},
                      "moe": {"num_experts": args.experts, "top_k": args.top_k,
                              "width_quantum": args.width_quantum, "expert_kernel": kernel, **moe}})


def layer_kind(name: str) -> str:
    return {"deepspeed": "deepspeed", "masked": "masked", "loop": "other", "grouped": "other", "ranges8": "ranges8"}.get(
        name.split("_")[0], "ours")


def policy(name: str):
    """The variant's width policy; normalised probability deploys its widths rounded to the
    training grid, as evaluation does by default."""
    from mose_ds.config import MoSEConfig
    from mose_ds.widths import NormProbPolicy, UniformPolicy
    if layer_kind(name) in ("other", "ranges8"):
        name = name.partition("_")[2]                  # (f), (g): the policy of the variant they repeat
    kind, _, value = name.partition("_")
    if kind in ("normprob", "masked"):
        return NormProbPolicy(float(value), grid=MoSEConfig().grid)
    return UniformPolicy(float(value) if value else 1.0)


def step_fn(name: str, layer, x, grad_out, record: dict):
    """Forward + backward of one variant; `record[name]` gets (units executed, units nominal:
    sum ceil(w H) of the widths the policy deployed) of ours, the latter left on the device
    (reading it would add a host sync to what is timed and counted)."""
    if layer_kind(name) == "deepspeed":
        def fn():
            x.grad = None
            out, l_aux, _ = layer(x)
            torch.autograd.backward([out, l_aux], [grad_out, None])
        return fn
    width_policy = policy(name)

    def fn():
        x.grad = None
        out, info = layer(x, width_policy)
        record[name] = (info.units, info.nominal_units)
        torch.autograd.backward([out, info.aux_loss], [grad_out, None])
    return fn


def inputs(args, tokens: int, device, dtype, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens // 8, 8, args.hidden, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    return x, torch.randn(x.shape, generator=gen).to(device=device, dtype=dtype)


def forward_flops(name: str, layer, x) -> int:
    from mose_ds.flops import flop_counter
    with flop_counter() as counter:   # (with autograd on: its module tracker needs it)
        layer(x) if layer_kind(name) == "deepspeed" else layer(x, policy(name))
    return counter.get_total_flops()


def layer_benchmark(args, device, dtype) -> dict:
    names = variant_names(args)
    layers = {kind: build_layer(args, kind, device, dtype)
              for kind in ("deepspeed", "ours", "masked", "ranges8") + (("other",) if kernels(args)[1] else ())}
    x, grad_out = inputs(args, args.tokens, device, dtype)
    units: dict[str, tuple[float, float]] = {}
    fns = {n: step_fn(n, layers[layer_kind(n)], x, grad_out, units) for n in names}
    flops = {n: forward_flops(n, layers[layer_kind(n)], x) for n in names}
    say(f"timing {len(names)} variants x {args.repeats} repeats (interleaved) ...")
    samples = measure.interleaved(fns, args.repeats)
    seconds, ratio = measure.medians(samples), measure.paired_ratios(samples, "full")
    full_units, full_flops = units["full"][0], flops["full"]
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in args.device_name), None)
    rows = []
    for n in names:
        tflops = 3 * flops[n] / seconds[n] / 1e12          # forward + backward ~ 3 x forward
        row = {"variant": n, "seconds": seconds[n], "time_ratio": ratio[n],
               "flops_ratio": flops[n] / full_flops, "tflops": tflops,
               "peak_fraction": tflops / peak if peak else None}
        if n in units:   # over full width's units
            row["executed_width"] = units[n][0] / full_units           # computed, range rounding included
            row["nominal_width"] = float(units[n][1]) / full_units     # the paper's sum of ceil(w H)
        if n.startswith(("uniform", "normprob")):
            row["target"] = row["executed_width"] + 0.10
            row["ok"] = row["time_ratio"] <= row["target"]
        if layer_kind(n) in ("other", "ranges8"):   # (f), (g) over the same policy as (b)-(d) run it
            row["vs_kernel"] = measure.paired_ratios(samples, n.partition("_")[2])[n]
        counter, row["cuda_syncs"] = counted(fns[n], x, grad_out, *layers[layer_kind(n)].parameters())
        row["syncs"], row["ops"] = counter.syncs, counter.ops_total
        rows.append(row)
    vs_deepspeed = 1 / ratio["deepspeed"]
    return {"layer": rows, "kernels": dict(zip(("kernel", "other"), kernels(args))),
            "full_vs_deepspeed": {"time_ratio": vs_deepspeed, "ok": vs_deepspeed <= 1}}


# ---------------------------------------------------------------------------------------
# peak memory, one fresh process per measurement


def memory_worker(args) -> None:
    """Child process: peak memory of one forward + backward of `args.variant` on
    `args.worker_tokens` tokens, above what the layer and its inputs hold before it."""
    from mose_ds import engine as engine_lib
    from mose_ds.train import quiet_libraries
    quiet_libraries()
    engine_lib.init_distributed()
    device, dtype = engine_lib.device(), DTYPES[args.dtype]
    layer = build_layer(args, layer_kind(args.variant), device, dtype)
    x, grad_out = inputs(args, args.worker_tokens, device, dtype)
    fn = step_fn(args.variant, layer, x, grad_out, {})
    fn()                       # first call: one-off allocations (thread pools, kernels)
    x.grad = None
    layer.zero_grad(set_to_none=True)
    exact = measure.reset_peak()
    base = measure.current()
    fn()
    with open(args.worker_out, "w") as f:
        json.dump({"peak_bytes": measure.peak() - base, "exact_window": exact}, f)


def measured_peak(args, variant: str, tokens: int) -> dict:
    from mose_ds.engine import child_env
    env = child_env()
    env.update(MALLOC_MMAP_THRESHOLD_="65536")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "peak.json")
        cmd = [sys.executable, "-m", __spec__.name, *args.argv, "--memory-worker", variant,
               str(tokens), out]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if result.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"memory measurement of {variant} at {tokens} tokens failed:\n{result.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def memory_benchmark(args) -> dict:
    jobs = [(n, args.tokens) for n in variant_names(args)]
    jobs += [("full", t) for t in args.memory_tokens if t != args.tokens]
    rows = []
    for i, (n, t) in enumerate(jobs):
        say(f"peak memory {i + 1}/{len(jobs)}: {n} at {t} tokens ...")
        rows.append({"variant": n, "tokens": t, **measured_peak(args, n, t)})
    full = {r["tokens"]: r["peak_bytes"] for r in rows if r["variant"] == "full"}
    lo, hi = min(full), max(full)
    growth = {"tokens": [lo, hi], "peak_ratio": full[hi] / full[lo], "token_ratio": hi / lo,
              "limit": 1.125 * hi / lo}   # 4.5x for 4x tokens: linear growth and a little
    growth["ok"] = growth["peak_ratio"] <= growth["limit"]
    at = {r["variant"]: r["peak_bytes"] for r in rows if r["tokens"] == args.tokens}
    return {"memory": rows, "memory_growth": growth,
            "full_vs_deepspeed_memory": {"ratio": at["full"] / at["deepspeed"], "ok": at["full"] < at["deepspeed"]}}


# ---------------------------------------------------------------------------------------
# training step


def step_model(args, recipe: str | None, hidden: int, **moe):
    """(run config, DeepSpeed engine, inputs, targets) of the training-step measurements: the
    recipe's model, or a CPU-sized 4-block model (MoE blocks 0 and 2) of width `hidden`."""
    from mose_ds import engine as engine_lib
    raw = to_dict(load_config(recipe)) if recipe else to_dict(from_dict({}))
    if not recipe:   # a CPU-sized model in which the MoE layers carry real weight
        raw["model"].update(num_layers=4, num_heads=4, hidden_size=hidden, vocab_size=8192)
        raw["moe"].update(num_experts=args.experts, top_k=args.top_k)
    raw["model"]["seq_len"] = args.seq_len
    raw["moe"].update(expert_parallel_size=1, **moe)
    raw["train"].update(micro_batch_size=args.micro_batch, grad_accum_steps=1, global_batch_size=None, max_iters=10**6)
    raw["engine"].update(zero_stage=1, precision=args.dtype)
    raw["mose"]["two_pass"] = "joint"
    cfg = from_dict(raw, source=recipe or "bench")
    engine = engine_lib.create_engine(cfg, engine_lib.build_model(cfg))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (args.micro_batch, args.seq_len + 1), generator=gen)
    return cfg, engine, tokens[:, :-1].to(engine.device), tokens[:, 1:].to(engine.device)


def step_benchmark(args) -> dict:
    """One engine step (micro-batch forward/backward + optimizer): two-pass vs full only."""
    from mose_ds.flops import forward_flops_per_token, two_pass_cost_ratio
    from mose_ds.train import train_micro_batch

    cfg, engine, x, y = step_model(args, args.recipe, args.hidden)

    fns = {"single": lambda: train_micro_batch(engine, cfg, x, y, None)}
    for w in args.step_widths:
        fns[f"two_w{w:g}"] = (lambda w=w: train_micro_batch(engine, cfg, x, y, w))
    say(f"timing the training step: single and {len(args.step_widths)} two-pass widths ...")
    samples = measure.interleaved(fns, args.repeats)
    t, ratio = measure.medians(samples), measure.paired_ratios(samples, "single")
    n_tokens = args.micro_batch * args.seq_len
    full_flops = 3 * forward_flops_per_token(cfg.model, cfg.moe, 1.0)["total"]   # forward + backward
    rows = []
    for w in args.step_widths:
        measured = ratio[f"two_w{w:g}"]
        predicted = two_pass_cost_ratio(cfg.model, cfg.moe, w)
        rows.append({"width": w, "measured": measured, "predicted": predicted,
                     "measured_over_predicted": measured / predicted, "ok": measured <= 1.05 * predicted,
                     "tokens_per_s": n_tokens / t[f"two_w{w:g}"],
                     "tflops": full_flops * predicted * n_tokens / t[f"two_w{w:g}"] / 1e12})
    return {"step_model": {k: getattr(cfg.model, k) for k in ("num_layers", "hidden_size", "seq_len", "vocab_size")}
            | {"num_experts": cfg.moe.num_experts, "top_k": cfg.moe.top_k, "micro_batch": args.micro_batch},
            "single_step_seconds": t["single"], "single_step_tflops": full_flops * n_tokens / t["single"] / 1e12,
            "two_pass_steps": rows}


# ---------------------------------------------------------------------------------------
# counters: host syncs and aten operations, which mean the same on a CPU and on a GPU


COUNTER_SHAPE = {"hidden": 64, "tokens": 2048, "seq_len": 64}   # counts do not depend on sizes
MOE_FILES = ("moe_layer.py", "dispatch.py", "experts.py", "grouped.py", "gating.py", "widths.py")


@dataclasses.dataclass(frozen=True)
class CycledWidths:
    """A per-token width policy whose sizes do not depend on routing: slot i of the flattened
    [T, K] slots runs at the i-th of `widths`, cyclically (every size in every layer)."""
    widths: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

    def __call__(self, p_TK, layer, relaxed=False):
        w = torch.tensor(self.widths).to(p_TK.device, non_blocking=True)
        return w.repeat(p_TK.numel() // len(self.widths) + 1)[:p_TK.numel()].view(p_TK.shape)


def layer_pass(layer, x, grad_out, width_policy):
    """One forward and backward of an MoE layer, gradients cleared first: the call whose host
    syncs and operations are counted."""
    def run():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        out, info = layer(x, width_policy)
        torch.autograd.backward([out, info.aux_loss], [grad_out, None])
    return run


def counted(fn, *device_tensors):
    """One call of fn under a host-sync and operation counter, after an uncounted warm-up, and
    on CUDA the syncs the device's own debug mode reports for one more call (else None)."""
    from mose_ds.counters import HostSyncCounter, cuda_sync_warnings
    fn()
    counter = HostSyncCounter()
    counter.device(*device_tensors)
    with counter:
        fn()
    if not measure.on_cuda():
        return counter, None
    with cuda_sync_warnings() as seen:
        fn()
    return counter, len(seen)


def counter_kernels(hidden: int) -> tuple[str, ...]:
    return ("loop", "grouped") if grouped.supported(hidden, 4 * hidden) else ("loop",)


def layer_counters(args, device, dtype) -> list[dict]:
    """Host syncs and aten operations of one MoE layer forward + backward (weights' gradients
    unset, as at the start of a step), dropless, at --experts and 64 experts, with each
    kernel: at full width, with 8 per-token widths whatever the routing (`CycledWidths`: the
    same buckets at any number of experts) and with the per-token widths of the first
    --budgets. (Dropless: with capacity, how many slots routing drops would change a few
    operations: capacity assignment, and a zero row for dropped slots in the combine.)"""
    small = argparse.Namespace(**{**vars(args), "hidden": COUNTER_SHAPE["hidden"]})
    names = ["full", "cycled"] + [f"normprob_{g:g}" for g in args.budgets[:1]]
    rows = []
    for experts in sorted({args.experts, 64}):
        small.experts = experts
        for kernel in counter_kernels(small.hidden):
            layer = our_layer(small, kernel, device, dtype, drop_tokens=False)
            x, grad_out = inputs(small, COUNTER_SHAPE["tokens"], device, dtype)
            for name in names:
                width_policy = CycledWidths() if name == "cycled" else policy(name)
                c, cuda_syncs = counted(layer_pass(layer, x, grad_out, width_policy), x, grad_out, *layer.parameters())
                rows.append({"experts": experts, "kernel": kernel, "policy": name, "syncs": c.syncs,
                             "cuda_syncs": cuda_syncs, "ops": c.ops_total, "sync_kinds": dict(c.by_kind)})
    return rows


def step_counters(args) -> list[dict]:
    """Host syncs of one two-pass training iteration (4 blocks, MoE blocks 0 and 2; after two
    warm-up iterations), by where they happen: the MoE layers, our training loop, DeepSpeed's
    engine, elsewhere; and per MoE-layer pass (one layer's forward and backward in one width
    branch) for the MoE layers and the training loop together."""
    from mose_ds.train import train_micro_batch
    small = argparse.Namespace(**{**vars(args), "seq_len": COUNTER_SHAPE["seq_len"]})
    rows = []
    for experts in sorted({args.experts, 64}):
        small.experts = experts
        for kernel in counter_kernels(COUNTER_SHAPE["hidden"]):
            cfg, engine, x, y = step_model(small, None, COUNTER_SHAPE["hidden"], expert_kernel=kernel)
            train_micro_batch(engine, cfg, x, y, 0.5)
            c, cuda_syncs = counted(lambda: train_micro_batch(engine, cfg, x, y, 0.5), x, y, *engine.module.parameters())
            where = {"moe_layer": 0, "training_loop": 0, "deepspeed": 0, "other": 0}
            for place, n in c.where.items():
                name = place.split(":")[0]
                key = ("moe_layer" if name in MOE_FILES else "training_loop" if name == "train.py"
                       else "deepspeed" if name.startswith("deepspeed/") else "other")
                where[key] += n
            passes = 2 * cfg.model.num_moe_layers
            rows.append({"experts": experts, "kernel": kernel, "syncs": c.syncs, "cuda_syncs": cuda_syncs, **where,
                         "per_layer_pass": (where["moe_layer"] + where["training_loop"]) / passes,
                         "places": dict(c.where)})
    return rows


def counter_benchmark(args, device, dtype) -> dict:
    say("counting host syncs and aten operations ...")
    layer, step = layer_counters(args, device, dtype), step_counters(args)
    per_pass = max(r["per_layer_pass"] for r in step)
    grouped_ops = {}
    for r in layer:
        if r["kernel"] == "grouped" and r["policy"] in ("full", "cycled"):   # the same buckets at any E
            grouped_ops.setdefault(r["policy"], set()).add(r["ops"])
    return {"counters": {"layer": layer, "step": step, "max_syncs_per_layer_pass": per_pass,
                         "syncs_ok": per_pass <= 3,
                         "grouped_ops_independent_of_experts": all(len(v) == 1 for v in grouped_ops.values())}}


# ---------------------------------------------------------------------------------------
# all-to-all bytes on 2 expert-parallel ranks


def exchange_worker(args) -> None:
    """One of two gloo ranks (EP=2): our layer's forward + backward with capacity factor
    1.25 and dropless, logging the bytes each all-to-all sends; rank 0 writes them."""
    from deepspeed import comm as dist
    from mose_ds import engine as engine_lib
    from mose_ds.counters import AllToAllLog
    from mose_ds.train import quiet_libraries
    quiet_libraries()
    engine_lib.init_distributed()
    device, dtype, rank = engine_lib.device(), DTYPES[args.dtype], dist.get_rank()
    results = {}
    for mode, drop in (("capacity", True), ("dropless", False)):
        layer = our_layer(args, kernels(args)[0], device, dtype, expert_parallel_size=2, drop_tokens=drop)
        x, grad_out = inputs(args, args.tokens // 2, device, dtype, seed=1 + rank)
        with AllToAllLog() as log:
            out, info = layer(x, policy("full"))
            torch.autograd.backward([out, info.aux_loss], [grad_out, None])
        routed = x.shape[0] * x.shape[1] * args.top_k
        results[mode] = {"sent": log.sent, "routed": routed,
                         "kept": round(routed * (1 - float(info.stats.dropped_frac))),
                         "row_bytes": args.hidden * out.element_size()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(args.worker_out, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


def exchange_benchmark(args) -> dict:
    """Bytes each all-to-all of one forward + backward moves over both ranks, per kept slot,
    against the payload minimum (a kept slot's row: hidden x element size)."""
    from mose_ds.engine import child_env, free_port
    env, on_gpus = child_env(), measure.on_cuda() and torch.cuda.device_count() >= 2
    if not on_gpus:   # two ranks cannot share one GPU's NCCL group; the bytes do not depend on the device
        env["CUDA_VISIBLE_DEVICES"] = ""
    say(f"all-to-all bytes on 2 expert-parallel {'NCCL' if on_gpus else 'gloo CPU'} ranks ...")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "exchange.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", __spec__.name, *args.argv, "--exchange-worker", out]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if result.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"the 2-rank exchange measurement failed:\n{result.stderr[-3000:]}")
        with open(out) as f:
            ranks = json.load(f)
    rows = []
    for mode in ("capacity", "dropless"):
        per_rank = [r[mode] for r in ranks]
        kept, routed = sum(r["kept"] for r in per_rank), sum(r["routed"] for r in per_rank)
        sent = [sum(r["sent"][i] for r in per_rank) for i in range(len(per_rank[0]["sent"]))]
        payload = kept * per_rank[0]["row_bytes"]
        rows.append({"mode": mode, "kept_slots": kept, "routed_slots": routed, "exchange_bytes": sent,
                     "bytes_per_kept_slot": [b / kept for b in sent], "payload_per_kept_slot": per_rank[0]["row_bytes"],
                     "largest_over_payload": max(sent) / payload})
    return {"exchange": rows}


# ---------------------------------------------------------------------------------------


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PARTS = ("layer", "memory", "step", "counters", "exchange")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mose-bench moe", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=16384, help="tokens through the MoE layer")
    p.add_argument("--width-quantum", type=int, default=1, help="moe.width_quantum of our layer")
    p.add_argument("--kernel", choices=("auto", "loop", "grouped"), default="auto",
                   help="moe.expert_kernel of (b)-(d); (f) runs the other one")
    p.add_argument("--widths", type=floats, default=[0.25, 0.5, 0.75], help="(c) uniform widths")
    p.add_argument("--budgets", type=floats, default=[0.5, 1.0, 1.5], help="(d), (e) normprob budgets in (0, k]")
    p.add_argument("--memory-tokens", type=ints, default=[16384, 65536],
                   help="token counts at which (b)'s peak memory is measured")
    p.add_argument("--recipe", default=None, help="model of the training step; default: a CPU-sized 4-layer model")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--step-widths", type=floats, default=[0.25, 0.5, 0.75, 1.0])
    p.add_argument("--repeats", type=int, default=7, help="timing rounds (variants interleaved)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak TFLOP/s for utilisation (default: known GPUs, dense bf16)")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: " + ", ".join(PARTS))
    p.add_argument("--json", action="store_true")
    p.add_argument("--memory-worker", nargs=3, metavar=("VARIANT", "TOKENS", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--exchange-worker", metavar="OUT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--json"]
    args.skip = {s for s in args.skip.split(",") if s}
    bad = args.skip - set(PARTS)
    if bad:
        p.error(f"--skip {','.join(sorted(bad))}: expected some of {', '.join(PARTS)}")
    if any(not 0 < w <= 1 for w in args.widths):
        p.error(f"--widths {args.widths}: widths must lie in (0, 1]")
    if any(not 0 < g <= args.top_k for g in args.budgets):
        p.error(f"--budgets {args.budgets}: budgets must lie in (0, top_k={args.top_k}]")
    if args.tokens % 16 or any(t % 8 for t in args.memory_tokens):
        p.error("--tokens must be a multiple of 16 and --memory-tokens of 8 (batches of 8 sequences, "
                "--tokens split over 2 ranks)")
    if args.kernel == "grouped" and not grouped.supported(args.hidden, 4 * args.hidden):
        p.error(f"--kernel grouped: --hidden {args.hidden} and its FFN size must be multiples of {grouped.GRANULE}")
    if args.memory_worker:
        args.variant, tokens, args.worker_out = args.memory_worker
        args.worker_tokens = int(tokens)
    if args.exchange_worker:
        args.worker_out = args.exchange_worker
    return args


@contextlib.contextmanager
def stdout_to_stderr():
    """Everything written to stdout goes to stderr meanwhile, loggers that hold the original
    stream and native code included (file-descriptor level)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker(args)
        return 0
    if args.exchange_worker:
        exchange_worker(args)
        return 0
    if args.json:   # keep stdout for the JSON document; library chatter goes to stderr
        with stdout_to_stderr():
            result = run(args)
        print(json.dumps(result, indent=2))
        return 0
    print_report(args, run(args))
    return 0


def run(args) -> dict:
    from mose_ds import engine as engine_lib
    from mose_ds.train import quiet_libraries
    quiet_libraries()
    engine_lib.init_distributed()
    device = engine_lib.device()
    args.device_name = (torch.cuda.get_device_name() if device.type == "cuda"
                        else f"cpu x{torch.get_num_threads()} threads")
    result = {"device": args.device_name, "dtype": args.dtype,
              "layer_shapes": {"hidden": args.hidden, "ffn_hidden": 4 * args.hidden, "experts": args.experts,
                               "top_k": args.top_k, "tokens": args.tokens, "width_quantum": args.width_quantum}}
    if "layer" not in args.skip:
        result |= layer_benchmark(args, device, DTYPES[args.dtype])
    if "memory" not in args.skip:
        result |= memory_benchmark(args)
    if "step" not in args.skip:
        result |= step_benchmark(args)
    if "counters" not in args.skip:
        result |= counter_benchmark(args, device, DTYPES[args.dtype])
    if "exchange" not in args.skip:
        result |= exchange_benchmark(args)
    return result


def print_report(args, r: dict) -> None:
    s = r["layer_shapes"]
    print(f"device: {r['device']}, {r['dtype']}; MoE layer: hidden {s['hidden']} (FFN {s['ffn_hidden']}), "
          f"E{s['experts']} top-{s['top_k']}, {s['tokens']} tokens")
    if "layer" in r:
        print(f"\nexpert kernel of (b)-(d): {r['kernels']['kernel']}; (f): {r['kernels']['other'] or 'none'}")
        print("forward + backward       | seconds | time / (b) | nominal width | executed width | FLOPs ratio | TFLOP/s "
              "| host syncs | aten ops | target <= | ok")
        for row in r["layer"]:
            width = (f"{row['nominal_width']:13.3f} | {row['executed_width']:14.3f}" if "executed_width" in row
                     else f"{'':13} | {'':14}")
            target = f"{row['target']:9.3f} | {row['ok']}" if "target" in row else f"{'':9} |"
            if "vs_kernel" in row:
                what = "16-range" if row["variant"].startswith("ranges8") else r["kernels"]["kernel"]
                target = f"{'':9} | {row['vs_kernel']:.3f}x the {what} kernel's time"
            print(f"  {row['variant']:22} | {row['seconds']:7.3f} | {row['time_ratio']:10.3f} | {width} | "
                  f"{row['flops_ratio']:11.3f} | {row['tflops']:7.3f} | {row['syncs']:10d} | {row['ops']:8d} | {target}")
        v = r["full_vs_deepspeed"]
        print(f"  (b) full / (a) deepspeed: {v['time_ratio']:.3f}x time ({'ok' if v['ok'] else 'SLOWER'})")
    if "memory" in r:
        print("\npeak memory of one forward + backward (above the layer and its inputs)")
        for row in r["memory"]:
            print(f"  {row['variant']:22} | {row['tokens']:7d} tokens | {row['peak_bytes'] / 2**20:9.1f} MiB")
        g, v = r["memory_growth"], r["full_vs_deepspeed_memory"]
        print(f"  (b) at {g['tokens'][1]} / {g['tokens'][0]} tokens: {g['peak_ratio']:.2f}x "
              f"(limit {g['limit']:.2f}x: {'ok' if g['ok'] else 'EXCEEDED'}); "
              f"(b) / (a) at {s['tokens']} tokens: {v['ratio']:.3f}x ({'ok' if v['ok'] else 'NOT LESS'})")
    if "two_pass_steps" in r:
        m = r["step_model"]
        print(f"\ntwo-pass step / single full-width step ({m['num_layers']} layers x {m['hidden_size']}, "
              f"E{m['num_experts']} top-{m['top_k']}, {m['micro_batch']} x {m['seq_len']} tokens; "
              f"single step {r['single_step_seconds']:.3f} s, {r['single_step_tflops']:.3f} TFLOP/s)\n"
              "  width | measured | FLOPs-predicted | measured / predicted | ok (<= 1.05) | tokens/s")
        for row in r["two_pass_steps"]:
            print(f"  {row['width']:5.2f} | {row['measured']:8.3f} | {row['predicted']:15.3f} | "
                  f"{row['measured_over_predicted']:20.3f} | {str(row['ok']):12} | {row['tokens_per_s']:8,.0f}")
    if "counters" in r:
        c = r["counters"]
        print(f"\nhost syncs and aten operations of one MoE layer forward + backward (dropless, hidden "
              f"{COUNTER_SHAPE['hidden']}, {COUNTER_SHAPE['tokens']} tokens; counts do not depend on sizes)\n"
              "  experts | kernel  | policy       | host syncs | aten ops")
        for row in c["layer"]:
            cuda = f" | CUDA sync debug mode: {row['cuda_syncs']}" if row["cuda_syncs"] is not None else ""
            print(f"  {row['experts']:7d} | {row['kernel']:7} | {row['policy']:12} | {row['syncs']:10d} | "
                  f"{row['ops']:8d}{cuda}")
        print("one two-pass training iteration (4 blocks, 2 MoE): host syncs by place, and per MoE-layer pass "
              "(MoE layers + training loop)\n"
              "  experts | kernel  | MoE layers | training loop | DeepSpeed | other | per layer pass")
        for row in c["step"]:
            print(f"  {row['experts']:7d} | {row['kernel']:7} | {row['moe_layer']:10d} | {row['training_loop']:13d} | "
                  f"{row['deepspeed']:9d} | {row['other']:5d} | {row['per_layer_pass']:14.2f}")
        print(f"  at most {c['max_syncs_per_layer_pass']:.2f} per layer pass (target <= 3: "
              f"{'ok' if c['syncs_ok'] else 'EXCEEDED'}); grouped kernel's aten ops independent of the "
              f"number of experts: {c['grouped_ops_independent_of_experts']}")
    if "exchange" in r:
        print("\nall-to-all on 2 expert-parallel gloo ranks, one forward + backward: bytes per kept slot of each "
              "exchange, in call order")
        for row in r["exchange"]:
            per_slot = ", ".join(f"{b:,.0f}" for b in row["bytes_per_kept_slot"])
            print(f"  {row['mode']:8} | {row['kept_slots']:,} of {row['routed_slots']:,} slots kept | {per_slot} | "
                  f"largest {row['largest_over_payload']:.2f}x the payload ({row['payload_per_kept_slot']} bytes a slot)")
    print("\nnothing written to disk; --json prints these figures as JSON")


if __name__ == "__main__":
    sys.exit(main())
