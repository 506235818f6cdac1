#!/usr/bin/env python
"""Training-cost benchmark, measured in one run (ratios are taken within the run).

(a) MoE-layer forward+backward time at uniform widths 0.25/0.5/0.75/1.0, relative to 1.0
    (target on CPU at hidden >= 256: ratio <= w + 0.10);
(b) two-pass training step (full + width w) over a single full-width step, next to the ratio
    predicted from FLOPs (target: measured <= 1.05 x predicted);
(c) our MoE layer at full width vs `deepspeed.moe.layer.MoE` with a plain FFN expert on the
    same shapes and capacity (target: not slower).

    python tools/bench_train.py                       # CPU defaults
    python tools/bench_train.py --hidden 256 --tokens 8192 --json
    python tools/bench_train.py --recipe ds_configs/gpt2_small_e8a2.yaml --seq-len 1024 --micro-batch 8   # GPU

Timings are medians over --repeats, measured interleaved so that drift affects all variants alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mose_ds.config import from_dict, load_config, to_dict  # noqa: E402

WIDTHS = (0.25, 0.5, 0.75, 1.0)
# Dense bf16 peak TFLOP/s by device name, for model FLOPs utilisation (override: --peak-tflops).
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per variant, variants alternating within each repeat."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            samples[key].append(timed(fn))
    return {k: statistics.median(v) for k, v in samples.items()}


def layer_benchmarks(args, device, dtype) -> dict:
    """(a) and (c): one MoE layer, forward + backward on `tokens` tokens."""
    from deepspeed.moe.layer import MoE
    from mose_ds.model import transformer_config
    from mose_ds.moe_layer import SlimmableMoE
    from mose_ds.widths import uniform_policy

    cfg = from_dict({"model": {"hidden_size": args.hidden, "num_heads": 1, "num_layers": 1},
                     "moe": {"num_experts": args.experts, "top_k": args.top_k}})
    D, H = args.hidden, cfg.model.ffn_hidden_size
    ours = SlimmableMoE(transformer_config(cfg.model), cfg.moe, H, "gelu", 0)
    plain = torch.nn.Sequential(torch.nn.Linear(D, H, bias=False), torch.nn.GELU(),
                                torch.nn.Linear(H, D, bias=False))
    theirs = MoE(D, plain, num_experts=args.experts, ep_size=1, k=args.top_k,
                 capacity_factor=cfg.moe.capacity_factor, eval_capacity_factor=cfg.moe.eval_capacity_factor,
                 min_capacity=cfg.moe.min_capacity)
    for layer in (ours, theirs):
        layer.set_deepspeed_parallelism()
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.02)
        layer.to(device=device, dtype=dtype).train()
    x = torch.randn(args.tokens // 8, 8, D, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn_like(x)   # a fixed upstream gradient: time the layer, not a loss

    def run_ours(width):
        def fn():
            x.grad = None
            out, info = ours(x, uniform_policy(width))
            torch.autograd.backward([out, info.aux_loss], [grad_out, None])
        return fn

    def run_theirs():
        x.grad = None
        out, l_aux, _ = theirs(x)
        torch.autograd.backward([out, l_aux], [grad_out, None])

    fns = {f"ours_w{w:.2f}": run_ours(w) for w in WIDTHS}
    fns["deepspeed_moe"] = run_theirs
    t = interleaved(fns, args.repeats)
    full = t["ours_w1.00"]
    widths = [{"width": w, "seconds": t[f"ours_w{w:.2f}"], "ratio": t[f"ours_w{w:.2f}"] / full,
               "target": w + 0.10, "ok": t[f"ours_w{w:.2f}"] / full <= w + 0.10} for w in WIDTHS]
    versus = {"ours_seconds": full, "deepspeed_seconds": t["deepspeed_moe"],
              "ours_over_deepspeed": full / t["deepspeed_moe"], "ok": full <= t["deepspeed_moe"]}
    return {"layer_widths": widths, "layer_vs_deepspeed": versus}


def step_benchmark(args, dtype_name) -> dict:
    """(b): one engine step (micro-batch forward/backward + optimizer), two-pass vs full only."""
    from mose_ds import engine as engine_lib
    from mose_ds.flops import forward_flops_per_token, two_pass_cost_ratio
    from mose_ds.train import train_micro_batch

    raw = to_dict(load_config(args.recipe)) if args.recipe else to_dict(from_dict({}))
    if not args.recipe:   # a CPU-sized model in which the MoE layers carry real weight
        raw["model"].update(num_layers=4, num_heads=4, hidden_size=args.hidden, vocab_size=8192)
        raw["moe"].update(num_experts=args.experts, top_k=args.top_k)
    raw["model"]["seq_len"] = args.seq_len
    raw["moe"]["expert_parallel_size"] = 1
    raw["train"].update(micro_batch_size=args.micro_batch, grad_accum_steps=1, max_iters=10**6)
    raw["engine"].update(zero_stage=1, precision=dtype_name)
    raw["mose"]["two_pass"] = "joint"
    cfg = from_dict(raw, source=args.recipe or "bench")
    engine = engine_lib.create_engine(cfg, engine_lib.build_model(cfg))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (args.micro_batch, args.seq_len + 1), generator=gen)
    x, y = tokens[:, :-1].to(engine.device), tokens[:, 1:].to(engine.device)

    fns = {"single": lambda: train_micro_batch(engine, cfg, x, y, None)}
    for w in WIDTHS:
        fns[f"two_w{w:.2f}"] = (lambda w=w: train_micro_batch(engine, cfg, x, y, w))
    t = interleaved(fns, args.repeats)
    n_tokens = args.micro_batch * args.seq_len
    full_flops = 3 * forward_flops_per_token(cfg.model, cfg.moe, 1.0)["total"]   # forward + backward
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in args.device_name), None)

    def throughput(seconds: float, flops_per_token: float) -> dict:
        tflops = flops_per_token * n_tokens / seconds / 1e12
        return {"tokens_per_s": n_tokens / seconds, "tflops": tflops, "mfu": tflops / peak if peak else None}

    rows = []
    for w in WIDTHS:
        measured = t[f"two_w{w:.2f}"] / t["single"]
        predicted = two_pass_cost_ratio(cfg.model, cfg.moe, w)
        rows.append({"width": w, "measured": measured, "predicted": predicted,
                     "measured_over_predicted": measured / predicted, "ok": measured <= 1.05 * predicted,
                     **throughput(t[f"two_w{w:.2f}"], full_flops * predicted)})
    return {"step_model": {k: raw["model"][k] for k in ("num_layers", "hidden_size", "seq_len", "vocab_size")}
            | {"num_experts": cfg.moe.num_experts, "top_k": cfg.moe.top_k, "micro_batch": args.micro_batch},
            "single_step_seconds": t["single"], "single_step": throughput(t["single"], full_flops),
            "peak_tflops": peak, "two_pass_steps": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=16384, help="tokens through the MoE layer in (a), (c)")
    p.add_argument("--recipe", default=None, help="model for (b); default: a CPU-sized 4-layer model")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak TFLOP/s for model FLOPs utilisation (default: known GPUs, bf16)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.json:   # keep stdout for the JSON document; library chatter goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            result = run(args)
        print(json.dumps(result, indent=2))
        return 0
    result = run(args)
    print_report(args, result)
    return 0


def run(args) -> dict:
    from mose_ds import engine as engine_lib
    from mose_ds.train import quiet_libraries
    quiet_libraries()
    engine_lib.init_distributed()
    device = engine_lib.device()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    args.device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    result = {"device": args.device_name,
              "dtype": args.dtype, "layer_shapes": {"hidden": args.hidden, "experts": args.experts,
                                                    "top_k": args.top_k, "tokens": args.tokens}}
    result |= layer_benchmarks(args, device, dtype)
    result |= step_benchmark(args, args.dtype)
    return result


def print_report(args, result: dict) -> None:
    print(f"device: {result['device']}, {args.dtype}; MoE layer: hidden {args.hidden}, E{args.experts}A{args.top_k}, "
          f"{args.tokens} tokens")
    print("\n(a) MoE layer fwd+bwd vs full width\n  width | seconds | ratio | target <= | ok")
    for r in result["layer_widths"]:
        print(f"  {r['width']:5.2f} | {r['seconds']:7.4f} | {r['ratio']:5.3f} | {r['target']:9.2f} | {r['ok']}")
    s = result["step_model"]
    print(f"\n(b) two-pass step / full-width step ({s['num_layers']} layers x {s['hidden_size']}, "
          f"E{s['num_experts']}A{s['top_k']}, {s['micro_batch']} x {s['seq_len']} tokens, "
          f"single step {result['single_step_seconds']:.3f} s)\n"
          "  width | measured | FLOPs-predicted | ratio | ok (<= 1.05) | tokens/s | TFLOP/s | MFU")

    def mfu(r):
        return f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"

    for r in result["two_pass_steps"]:
        print(f"  {r['width']:5.2f} | {r['measured']:8.3f} | {r['predicted']:15.3f} | "
              f"{r['measured_over_predicted']:5.3f} | {str(r['ok']):12} | {r['tokens_per_s']:8,.0f} | "
              f"{r['tflops']:7.3f} | {mfu(r)}")
    single = result["single_step"]
    print(f"  single full-width step: {single['tokens_per_s']:,.0f} tokens/s, {single['tflops']:.3f} TFLOP/s, "
          f"MFU {mfu(single)}")
    v = result["layer_vs_deepspeed"]
    print(f"\n(c) ours at full width {v['ours_seconds']:.4f} s vs deepspeed.moe.layer.MoE "
          f"{v['deepspeed_seconds']:.4f} s: {v['ours_over_deepspeed']:.3f}x ({'not slower' if v['ok'] else 'SLOWER'})")


if __name__ == "__main__":
    sys.exit(main())
