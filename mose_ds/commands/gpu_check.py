#!/usr/bin/env python
"""GPU acceptance check: one command, at most 8 minutes on one H100 / H200 / B200, that shows the
CUDA path works. It prints one PASS / FAIL / INFO line per check and writes every figure to a
JSON file; the exit status is 1 if any check failed (a check that raises is a FAIL line with its
reason, and the others still run):

  environment       versions, device, attention backends, the expert kernel `auto` picks
  grouped_mm        raw `torch._grouped_mm` in bf16 in grouped.py's three forms, against
                    per-group products (empty and odd-sized groups)
  moe_vs_cpu        the MoE layer on the device against the same weights on the CPU in fp32,
                    outputs and every gradient: loop and grouped kernels, uniform and per-token
                    widths, capacity drops, dropless with shared experts
  host_syncs        syncs of one MoE layer forward + backward (CUDA's sync debug mode; 1 expected)
  bench_moe,        TFLOP/s of a MoE layer and of causal attention, forward + backward, against
  bench_attention   the device's dense bf16 peak
  train_resume      40 iterations of gpt2_small_e8a2 in bf16 on synthetic data: tokens/s, model
                    FLOPs utilisation, loss going down, peak memory within mose-plan-memory's
                    plan; a resume to 45; its universal checkpoint (convert_checkpoint.py) resumed
  deepseek          a 4-layer DeepSeek-V2-Lite-shaped model at sequence 4096, dropless, activation
                    checkpointing, bf16: forward + backward + step, finite losses, memory, tokens/s
  decoding          KV-cache decoding of tiny GPT-2 and DeepSeek-V2 models (masked attention on the
                    device's kernels) against their full forward in fp32, every policy kind; greedy
                    self-speculative text equal to plain greedy text; bf16 generation runs

Tensors agree when ||got - want|| / ||want|| <= 2e-2 in bf16 (a few roundings of bf16's 2^-8
unit; the CPU's bf16 layer is at 5e-3) or 1e-4 in fp32 (summation order). `--smoke` runs the same
checks on the CPU at toy sizes in fp32 (host syncs by counters.HostSyncCounter, memory planned
but not measured) in under 2 minutes.

    python -m mose_ds.commands.gpu_check [--out runs/gpu_check/gpu_check.json]
    python -m mose_ds.commands.gpu_check --smoke --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import math
import os
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository
with contextlib.redirect_stdout(sys.stderr):     # stdout is for the check lines (DeepSpeed talks on import)
    from mose_ds.commands.bench_moe import (PEAK_BF16_TFLOPS, counted, forward_flops, inputs, layer_pass, our_layer, stdout_to_stderr,
                           step_fn)
    from mose_ds.commands.plan_memory import grad_accum_dtype, param_counts

    from mose_ds import measure

TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}
BUDGET_S = {"gpu": 480, "smoke": 120}
# DeepSeek-V2-Lite's architecture (from its public config.json) over ds_configs/hf/tiny_deepseek_v2,
# cut to 4 layers: a dense block and 3 MoE blocks of 64 routed experts top-6 plus 2 shared.
LITE_SHAPE = {"hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "n_routed_experts": 64,
              "num_experts_per_tok": 6, "num_attention_heads": 16, "num_key_value_heads": 16, "kv_lora_rank": 512,
              "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 102400,
              "max_position_embeddings": 163840, "num_hidden_layers": 4,
              "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                               "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}}


@dataclasses.dataclass
class Sizes:
    gmm_groups: list[int]       # rows per group of the raw grouped products
    gmm_kn: tuple[int, int]
    moe: dict                   # the layer compared with the CPU: hidden, ffn, experts, seq, batch
    bench: dict                 # bench_moe's layer: hidden (FFN 4x), experts, top_k, tokens
    attention: list[tuple]      # (batch, heads, seq, q/k head dim, v head dim)
    recipe: str
    overrides: list[str]
    iters: tuple[int, int]      # the first run stops at iters[0], the resumed one runs to iters[1]
    deepseek_seq: int
    repeats: int = 5


SIZES = {
    "gpu": Sizes([0, 1, 77, 0, 333, 1030, 5, 64], (512, 384),
                 {"hidden": 512, "ffn": 1024, "experts": 8, "seq": 128, "batch": 8},
                 {"hidden": 1024, "experts": 64, "top_k": 8, "tokens": 32768},
                 [(8, 12, 1024, 64, 64), (2, 16, 4096, 192, 128)],
                 "ds_configs/gpt2_small_e8a2.yaml", ["train.global_batch_size=72"],   # accumulation 6 on one GPU
                 (40, 45), 4096),
    "smoke": Sizes([0, 1, 7, 0, 33, 13, 5, 4], (64, 48), {"hidden": 32, "ffn": 64, "experts": 4, "seq": 16, "batch": 4},
                   {"hidden": 64, "experts": 4, "top_k": 2, "tokens": 512}, [(1, 2, 128, 16, 16), (1, 2, 128, 24, 16)],
                   "ds_configs/tiny_cpu.yaml", ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=2",
                                               "model.seq_len=64", "model.vocab_size=512", "train.micro_batch_size=2"],
                   (8, 10), 128, repeats=2),
}


# --------------------------------------------------------------------------- comparison


def rel_error(got: torch.Tensor | None, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in fp64 (the plain norm where want is zero; inf for a missing
    tensor or another shape; NaN where either holds a NaN)."""
    if got is None or got.shape != want.shape:
        return math.inf
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    diff, norm = float((got - want).norm()), float(want.norm())
    return diff / norm if norm > 0 else diff


def compare(got: dict, want: dict, tol: float) -> dict:
    """Relative errors of the tensors of `want` and their namesakes in `got`; ok when every one
    is within tol (NaN is not)."""
    errors = {name: rel_error(got.get(name), want[name]) for name in want}
    worst = max(errors, key=lambda n: nan_last(errors[n]))
    return {"ok": all(e <= tol for e in errors.values()), "worst": worst, "error": errors[worst], "errors": errors}


def nan_last(error: float) -> float:
    return math.inf if math.isnan(error) else error


def result(ok: bool | None, summary: str, **details) -> dict:
    return {"status": "INFO" if ok is None else "PASS" if ok else "FAIL", "summary": summary, **details}


# --------------------------------------------------------------------------- environment, grouped products


def check_environment(ctx) -> dict:
    from mose_ds import attention, devices, grouped
    s = ctx.sizes.moe
    info = devices.environment(
        ctx.device, attention_gpt2=attention.backend_name(ctx.device, ctx.dtype, 6, 64, 1024),
        attention_mla=attention.backend_name(ctx.device, ctx.dtype, 16, 192, 4096),
        expert_kernel="grouped" if grouped.auto_picks_grouped(ctx.device, ctx.dtype, s["hidden"], s["ffn"]) else "loop",
        dtype=ctx.dtype_name)
    return result(None, " | ".join(f"{k} {v}" for k, v in info.items()), **info)


def check_grouped_mm(ctx) -> dict:
    """grouped.py's three forms: rows x [G, K, N] weights; rows x a transposed slice of [G, units, K]
    weights (as experts store theirs); a transposed [K, n] x [n, N] reduced per group (weight
    gradients), empty groups zeroed as grouped.py does. bf16 everywhere (the CPU runs it too)."""
    if not hasattr(torch, "_grouped_mm"):
        return result(None, f"skipped: torch {torch.__version__} has no _grouped_mm")
    dev, dt, sizes, (K, N) = ctx.device, torch.bfloat16, ctx.sizes.gmm_groups, ctx.sizes.gmm_kn
    G, n, gen = len(sizes), sum(sizes), torch.Generator().manual_seed(0)
    a, c = (torch.randn(n, d, generator=gen).to(dev, dt) for d in (K, N))
    b, w = torch.randn(G, K, N, generator=gen).to(dev, dt), torch.randn(G, N + 8, K, generator=gen).to(dev, dt)
    offs = torch.tensor(sizes).cumsum(0).to(dev, torch.int32)
    rows = list(zip([0] + offs.tolist()[:-1], offs.tolist()))
    w_view = w[:, :N].transpose(1, 2)                                    # [G, K, N], column-major
    empty = torch.tensor([size == 0 for size in sizes], device=dev).view(-1, 1, 1)
    got = {"rows x weights": torch._grouped_mm(a, b, offs=offs),
           "rows x transposed slice": torch._grouped_mm(a, w_view, offs=offs),
           "weight-gradient reduction": torch._grouped_mm(a.t(), c, offs=offs).masked_fill_(empty, 0)}
    want = {"rows x weights": torch.cat([a[i:j].float() @ b[g].float() for g, (i, j) in enumerate(rows)]),
            "rows x transposed slice": torch.cat([a[i:j].float() @ w_view[g].float() for g, (i, j) in enumerate(rows)]),
            "weight-gradient reduction": torch.stack([a[i:j].float().t() @ c[i:j].float() for i, j in rows])}
    cmp = compare(got, want, TOLERANCE[dt])
    where = ctx.device_name + (f" (capability {ctx.capability})" if ctx.capability else "")
    return result(cmp["ok"], f"bf16 on {where}, groups {sizes}, K {K}, N {N}: worst relative error {cmp['error']:.2e} "
                  f"({cmp['worst']}; tolerance {TOLERANCE[dt]:g})", errors=cmp["errors"])


# --------------------------------------------------------------------------- the MoE layer


def build_moe(s: dict, kernel: str, drop: bool):
    """One case's layer on the CPU in fp32, from fixed seeds (two calls give equal layers). With
    capacity: GPT-2's experts (GELU, no shared ones); dropless: DeepSeek's (SwiGLU, softmax over
    all experts, sequence balance loss, 2 shared experts). Router weights and inputs
    (`moe_inputs`) lie on coarse grids, so router logits are exact in fp32 whatever the summation
    order, with a distinct offset per expert against ties: every device routes alike."""
    from mose_ds.config import from_dict
    from mose_ds.gating import RouterSpec
    from mose_ds.model import transformer_config
    from mose_ds.moe_layer import SlimmableMoE
    activation, E = "gelu" if drop else "swiglu", s["experts"]
    cfg = from_dict({"model": {"hidden_size": s["hidden"], "num_heads": 1, "num_layers": 1, "activation": activation},
                     "moe": {"num_experts": E, "top_k": 2, "expert_kernel": kernel, "drop_tokens": drop,
                             "capacity_factor": 1.0}})
    router = RouterSpec() if drop else RouterSpec(scores="softmax", normalize=False, balance="sequence")
    layer = SlimmableMoE(transformer_config(cfg.model), cfg.moe, s["ffn"], activation, 0, router=router,
                         shared_hidden_size=0 if drop else 2 * s["ffn"])
    layer.set_deepspeed_parallelism()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        layer.router.weight.copy_(torch.randint(-16, 17, (E, s["hidden"]), generator=gen) / 64)
        layer.router.weight[:, 0] = torch.arange(E) / (512 * E)          # times x[..., 0] = 1
    return layer.train()


def moe_inputs(s: dict) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x_SBD = torch.randint(-16, 17, (s["seq"], s["batch"], s["hidden"]), generator=gen) / 8
    x_SBD[..., 0] = 1
    return x_SBD, torch.randn(x_SBD.shape, generator=gen)


def moe_cases(ctx):
    from mose_ds import grouped
    from mose_ds.widths import NormProbPolicy, UniformPolicy
    kernels = ("loop", "grouped") if grouped.supported(ctx.sizes.moe["hidden"], ctx.sizes.moe["ffn"]) else ("loop",)
    for kernel in kernels:
        for drop in (True, False):
            for name, policy in (("uniform 0.5", UniformPolicy(0.5)), ("normprob 1", NormProbPolicy(1.0))):
                yield f"{kernel}/{'capacity' if drop else 'dropless'}/{name}", kernel, drop, policy


def reference_moe(layer, x_SBD: torch.Tensor, policy) -> torch.Tensor:
    """Paper eq. 5 densely, in plain autograd ops: every expert on every token at full width, its
    hidden units past a slot's size zeroed, weighted by p where the token chose it and the slot
    was kept; plus the shared experts. The routing is the layer's own (gating.py)."""
    from mose_ds.widths import hidden_units
    S, B, D = x_SBD.shape
    x_TD, H = x_SBD.reshape(S * B, D), layer.ffn_hidden_size
    route = layer.route(x_TD, B, layer.k)
    m_TK = hidden_units(policy(route.p_TK, 0), H, layer.moe.width_quantum)
    out_TD = torch.zeros_like(x_TD)
    for e, expert in enumerate(layer.local_experts):
        h_TH = expert.hidden(x_TD, 0, H)
        for k in range(layer.k):
            mask_TH = (torch.arange(H) < m_TK[:, k, None]) & ((route.idx_TK[:, k] == e) & route.keep_TK[:, k])[:, None]
            out_TD = out_TD + route.p_TK[:, k, None] * ((h_TH * mask_TH) @ expert.w_down)
    if layer.shared_ffn is not None:
        out_TD = out_TD + layer.shared_ffn.hidden(x_TD, 0, layer.shared_ffn.ffn_hidden_size) @ layer.shared_ffn.w_down
    return out_TD.view(S, B, D)


def gradients(layer, x, out, g) -> dict:
    """Output and every gradient of a backward from output gradient g, on the CPU in fp32 (a
    tensor without one has none here: `compare` finds it missing)."""
    out.backward(g)
    tensors = {"output": out, "grad input": x.grad, **{f"grad {n}": p.grad for n, p in layer.named_parameters()}}
    return {k: v.detach().float().cpu() for k, v in tensors.items() if v is not None}


def check_moe_vs_cpu(ctx) -> dict:
    s, tol, cases = ctx.sizes.moe, TOLERANCE[ctx.dtype], {}
    x, g = moe_inputs(s)
    for name, kernel, drop, policy in moe_cases(ctx):
        ref = build_moe(s, kernel, drop)
        with torch.no_grad():
            for p in ref.parameters():
                p.copy_(p.to(ctx.dtype).float())                          # the device's weights, in fp32
        layer = build_moe(s, kernel, drop).to(ctx.device, ctx.dtype)
        xd = x.to(ctx.device, ctx.dtype).requires_grad_()
        got = gradients(layer, xd, layer(xd, policy)[0], g.to(ctx.device, ctx.dtype))
        xr = x.to(ctx.dtype).float().requires_grad_()
        want = gradients(ref, xr, reference_moe(ref, xr, policy), g.to(ctx.dtype).float())
        cases[name] = compare(got, want, tol)
    worst = max(cases, key=lambda k: nan_last(cases[k]["error"]))
    return result(all(c["ok"] for c in cases.values()),
                  f"{len(cases)} cases, {ctx.device_name} {ctx.dtype_name} against a CPU fp32 reference: worst "
                  f"relative error {cases[worst]['error']:.2e} ({worst}, {cases[worst]['worst']}; tolerance {tol:g})",
                  cases={k: {"ok": c["ok"], "worst": c["worst"], "error": c["error"]} for k, c in cases.items()})


def check_host_syncs(ctx) -> dict:
    """One layer forward + backward (aux loss included, as in training) after a warm-up, by
    bench_moe's `counted`: CUDA's own sync debug mode on a GPU, the provenance counter
    (counters.HostSyncCounter, whose sites go to the JSON) on the CPU."""
    counts, where = {}, {}
    for name, kernel, drop, policy in moe_cases(ctx):
        if name.endswith("uniform 0.5"):
            continue
        layer = build_moe(ctx.sizes.moe, kernel, drop).to(ctx.device, ctx.dtype)
        x, g = (t.to(ctx.device, ctx.dtype) for t in moe_inputs(ctx.sizes.moe))
        x.requires_grad_()
        counter, cuda_syncs = counted(layer_pass(layer, x, g, policy), x, g, *layer.parameters())
        counts[name], where[name] = counter.syncs if cuda_syncs is None else cuda_syncs, dict(counter.where)
    how = "CUDA sync debug mode" if ctx.device.type == "cuda" else "HostSyncCounter"
    return result(all(n == 1 for n in counts.values()), f"{how}, per layer forward + backward (1 expected): "
                  + ", ".join(f"{k} {v}" for k, v in counts.items()), counts=counts, where=where)


# --------------------------------------------------------------------------- microbenchmarks


def rate(flops: float, seconds: float, ctx) -> str:
    tflops = flops / seconds / 1e12
    return f"{tflops:.3g} TFLOP/s" + (f" ({100 * tflops / ctx.peak:.1f}% of {ctx.peak:g})" if ctx.peak else "")


def check_bench_moe(ctx) -> dict:
    """bench_moe.py's layer (b) at full width with the kernel `auto` picks; FLOPs 3 x the counted forward's."""
    from mose_ds import grouped
    b = ctx.sizes.bench
    args = argparse.Namespace(width_quantum=1, **{k: v for k, v in b.items() if k != "tokens"})
    kernel = "grouped" if grouped.auto_picks_grouped(ctx.device, ctx.dtype, b["hidden"], 4 * b["hidden"]) else "loop"
    layer = our_layer(args, kernel, ctx.device, ctx.dtype)
    x, grad_out = inputs(args, b["tokens"], ctx.device, ctx.dtype)
    flops = 3 * forward_flops("full", layer, x)
    fn = step_fn("full", layer, x, grad_out, {})
    seconds = measure.medians(measure.interleaved({"moe": fn}, ctx.sizes.repeats))["moe"]
    return result(None, f"hidden {b['hidden']}, E{b['experts']} top-{b['top_k']}, {b['tokens']} tokens, {kernel} "
                  f"kernel: {seconds * 1e3:.1f} ms, {rate(flops, seconds, ctx)}",
                  seconds=seconds, tflops=flops / seconds / 1e12, kernel=kernel)


def check_bench_attention(ctx) -> dict:
    """FLOPs: 3 x the causal forward's, QK^T and PV over half the S x S square."""
    from mose_ds.attention import causal_attention
    rows, gen = [], torch.Generator().manual_seed(0)
    for B, N, S, H, V in ctx.sizes.attention:
        q, k, v, g = (torch.randn(B, N, S, d, generator=gen).to(ctx.device, ctx.dtype) for d in (H, H, V, V))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        seconds = measure.medians(measure.interleaved(
            {"attention": lambda: causal_attention(q, k, v, H ** -0.5).backward(g)}, ctx.sizes.repeats))["attention"]
        flops = 3 * B * N * S * S * (H + V)
        rows.append({"shape": [B, N, S, H, V], "seconds": seconds, "tflops": flops / seconds / 1e12,
                     "text": f"{B} x {N} heads x {S} x {H}/{V}: {seconds * 1e3:.1f} ms, {rate(flops, seconds, ctx)}"})
    return result(None, "; ".join(r.pop("text") for r in rows), shapes=rows)


# --------------------------------------------------------------------------- training


def write_tokens(folder: str, vocab: int, count: int) -> str:
    """A folder in mose-prepare's format (train.bin, val.bin, meta.json) of Zipf-
    distributed ids: a corpus whose unigram law a model learns in tens of iterations."""
    from mose_ds.prepared import write_meta
    os.makedirs(folder, exist_ok=True)
    dtype = np.uint16 if vocab <= 2 ** 16 else np.uint32
    ids, cut = ((np.random.default_rng(0).zipf(1.2, count) - 1) % vocab).astype(dtype), count * 9 // 10
    ids[:cut].tofile(os.path.join(folder, "train.bin"))
    ids[cut:].tofile(os.path.join(folder, "val.bin"))
    write_meta(folder, {"tokenizer": "gpt2", "vocab_size": vocab, "eot_id": 0, "dtype": np.dtype(dtype).name,
                        "train_tokens": cut, "val_tokens": count - cut, "documents": 1, "source": "gpu_check"})
    return folder


def run_training(cfg) -> dict:
    """mose_ds.train.train in this process, its log kept off stdout."""
    from mose_ds.train import train
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train(cfg)
    summary.pop("engine")                                               # free it before the next run
    gc.collect()
    return summary


def memory(cfg, ctx, measured: int | None) -> tuple[bool, str]:
    """The peak against mose-plan-memory's plan for one GPU: within it plus 25% (a plan that
    underestimates fails). CPU peaks (resident memory) are not comparable: planned only."""
    from mose_ds.memory import Cluster, plan
    gib = torch.cuda.get_device_properties(ctx.device).total_memory / 2 ** 30 if measured is not None else 1024.0
    planned = plan(cfg, param_counts(cfg), Cluster(1, 1, gib), grad_accum_dtype(cfg))["peak"]
    if measured is None:
        return True, f"planned peak {planned / 2 ** 30:.2f} GiB (not measured on CPU)"
    return measured <= 1.25 * planned, (f"peak {measured / 2 ** 30:.2f} GiB, planned {planned / 2 ** 30:.2f} GiB "
                                        f"({measured / planned:.2f}x)")


def check_train_resume(ctx) -> dict:
    from mose_ds.commands import convert_checkpoint
    from mose_ds.config import load_config
    from mose_ds.flops import forward_flops_per_token
    s, (stop, end), cuda = ctx.sizes, ctx.sizes.iters, ctx.device.type == "cuda"
    recipe = os.path.join(ROOT, s.recipe)
    base = load_config(recipe, s.overrides)
    m, t = base.model, base.train
    data = write_tokens(os.path.join(ctx.tmp, "data"), m.vocab_size,
                        (end + 2) * t.geometry(1).global_batch * (m.seq_len + 1) * 10 // 9)
    run, universal = os.path.join(ctx.tmp, "run"), os.path.join(ctx.tmp, "universal")
    common = [*s.overrides, f"data.path={data}", f"logging.out_dir={run}", "logging.tensorboard=false",
              f"engine.device={ctx.device.type}", f"train.max_iters={end}", "train.eval_interval=100000",
              "train.eval_batches=2", "train.log_interval=10", "checkpoint.interval=100000", "optim.warmup_iters=5"]
    cfg = load_config(recipe, common + [f"train.stop_at={stop}"])
    measure.reset_peak()
    before = measure.current()
    first = run_training(cfg)
    mem_ok, mem = memory(cfg, ctx, measure.peak() - before if cuda else None)
    losses = [h["loss_full"] for h in first["history"]]
    q = max(1, len(losses) // 4)
    start_loss, end_loss = sum(losses[:q]) / q, sum(losses[-q:]) / q
    tokens_per_s = first["tokens_per_s"] or math.nan      # over the last logging interval: stop-9..stop
    flops = [3 * forward_flops_per_token(m, base.moe)["total"]
             + (3 * forward_flops_per_token(m, base.moe, h["width"])["total"] if h["width"] else 0)
             for h in first["history"][-10:]]
    mfu = tokens_per_s * sum(flops) / len(flops) / (ctx.peak * 1e12) if ctx.peak else None

    second = run_training(load_config(recipe, common))
    resumed = [h["iteration"] for h in second["history"]]
    with contextlib.redirect_stdout(io.StringIO()):
        converted = convert_checkpoint.main(["--ckpt", run, "--out", universal]) == 0
    third = run_training(load_config(recipe, common + [
        f"logging.out_dir={run}_universal", f"checkpoint.resume={universal}", f"train.max_iters={end + 1}"]))
    after = third["history"][0]
    reloaded = converted and after["iteration"] == end + 1 and after["loss_full"] < start_loss   # NaN fails
    ok = mem_ok and end_loss < start_loss and resumed == list(range(stop + 1, end + 1)) and reloaded
    return result(ok, f"{m.name} {base.engine.precision}, {stop} iterations: {tokens_per_s:,.0f} tok/s, "
                  + (f"MFU {100 * mfu:.1f}%, " if mfu is not None else "")
                  + f"loss {start_loss:.3f} -> {end_loss:.3f} (first/last {q}); {mem}; resumed at {resumed[:1]}, "
                  f"ran to {resumed[-1:]}; universal checkpoint resumed at {after['iteration']}, "
                  f"loss {after['loss_full']:.3f}",
                  losses=losses, tokens_per_s=tokens_per_s, mfu=mfu, resumed=resumed, universal_loss=after["loss_full"])


# One micro-batch of one sequence per step, whatever global batch the recipe states.
DEEPSEEK_OVERRIDES = ["moe.drop_tokens=false", "train.activation_checkpointing=true", "train.micro_batch_size=1",
                      "train.grad_accum_steps=1", "train.global_batch_size=null", "mose.enabled=true",
                      "mose.two_pass=sequential", "logging.tensorboard=false", 'checkpoint.init_from=""']


def check_deepseek(ctx) -> dict:
    from mose_ds import engine as engine_lib
    from mose_ds.config import load_config
    from mose_ds.deepseek import read_hf_config
    from mose_ds.train import train_micro_batch
    common = [f"model.seq_len={ctx.sizes.deepseek_seq}", *DEEPSEEK_OVERRIDES, f"engine.device={ctx.device.type}"]
    if ctx.smoke:
        cfg = load_config(os.path.join(ROOT, "ds_configs", "deepseek_tiny_base_cpu.yaml"), common)
    else:   # the recipe names the real model's folder: the Lite shape goes in as a config.json of our own
        hf_file = os.path.join(ctx.tmp, "deepseek_v2_lite_4_layers.json")
        with open(hf_file, "w") as f:
            json.dump({**read_hf_config(os.path.join(ROOT, "ds_configs", "hf", "tiny_deepseek_v2")), **LITE_SHAPE}, f)
        cfg = load_config(os.path.join(ROOT, "ds_configs", "deepseek_v2_lite_cpt.yaml"),
                          common + [f"model.hf_config={hf_file}", "moe.expert_parallel_size=1"])
    measure.reset_peak()
    before = measure.current()
    engine = engine_lib.create_engine(cfg, engine_lib.build_model(cfg))
    params = sum(p.numel() for p in engine.module.parameters())
    gen, losses, seconds, S = torch.Generator().manual_seed(0), [], [], cfg.model.seq_len
    for _ in range(3):                                                  # the first one warms up
        tokens = torch.randint(0, cfg.model.vocab_size, (1, S + 1), generator=gen).to(ctx.device)
        start = time.perf_counter()
        stats, _ = train_micro_batch(engine, cfg, tokens[:, :-1], tokens[:, 1:], 0.5)
        measure.sync()                                                  # the step's work is done
        seconds.append(time.perf_counter() - start)
        losses += [float(lm) for lm, _ in stats.values()]
    _, mem = memory(cfg, ctx, measure.peak() - before if ctx.device.type == "cuda" else None)
    del engine
    tokens_per_s, finite = S * 2 / sum(seconds[1:]), all(math.isfinite(v) for v in losses)
    return result(finite, f"{cfg.model.num_layers} layers x {cfg.model.hidden_size}, {params / 1e9:.2f}B parameters, "
                  f"sequence {S}, dropless, recompute, {cfg.engine.precision} ZeRO-{cfg.engine.zero_stage}: "
                  f"{tokens_per_s:,.0f} tok/s (two-pass steps), losses {'finite' if finite else 'NOT FINITE'} "
                  f"(last {losses[-1]:.3f}); {mem}", losses=losses, tokens_per_s=tokens_per_s, params=params)


def check_decoding(ctx) -> dict:
    from mose_ds.config import from_dict
    from mose_ds.generation import PlainDecoding, SelfSpeculativeDecoding
    from mose_ds.kv_cache import KVCache
    from mose_ds.model import build_model
    from mose_ds.widths import FULL_WIDTH, NormProbPolicy, UniformPolicy
    tiny = {"name": "decode", "num_layers": 4, "num_heads": 2, "hidden_size": 64, "vocab_size": 64, "seq_len": 64,
            "init_std": 0.15}
    configs = {"gpt2": from_dict({"model": tiny, "moe": {"num_experts": 4, "top_k": 2, "drop_tokens": False}}),
               "deepseek_v2": from_dict({"model": {"hf_config": os.path.join(ROOT, "ds_configs", "hf", "tiny_deepseek_v2"),
                                                   "seq_len": 64}, "moe": {"drop_tokens": False}})}
    errors, identical, gen = {}, {}, torch.Generator().manual_seed(0)
    for family, cfg in configs.items():
        model = build_model(cfg, "cpu", seed=0).to(ctx.device).eval()
        vocab = min(cfg.model.vocab_size, 64)
        rows = [torch.randint(0, vocab, (n,), generator=gen) for n in (13, 7, 10)]
        policies = {"full": FULL_WIDTH, "uniform0.5": UniformPolicy(0.5),
                    "normprob1": NormProbPolicy(1.0, grid=cfg.mose.grid), "top_k1": UniformPolicy(0.75, top_k=1)}
        with torch.no_grad():
            for name, policy in policies.items():
                full = [model(r[None].to(ctx.device), policy)[0][0] for r in rows]
                cache, start, got = KVCache(len(model.layers), 3, 16, ctx.device), 0, [[] for _ in rows]
                for size in (5, 1, 1, 4, 1, 1, 1):
                    ids = torch.zeros(3, size, dtype=torch.long)
                    for b, r in enumerate(rows):
                        part = r[start:start + size]
                        ids[b, :len(part)] = part
                    logits, _ = model(ids.to(ctx.device), policy, context=cache.step([start] * 3, size))
                    for b, r in enumerate(rows):
                        got[b].append(logits[b, :max(0, min(size, len(r) - start))])
                    start += size
                errors[f"{family}/{name}"] = max(rel_error(torch.cat(g), f) for g, f in zip(got, full))
            count, new = (3, 8) if ctx.smoke else (8, 16)
            prompts = [torch.randint(0, vocab, (int(n),), generator=gen).tolist() for n in torch.randint(2, 9, (count,))]
            plain = PlainDecoding(model, FULL_WIDTH).generate(prompts, new)
            for w, n in ((0.25, 2), (0.5, 4), (0.75, 8)):
                spec = SelfSpeculativeDecoding(model, FULL_WIDTH, UniformPolicy(w), n).generate(prompts, new)
                identical[f"{family}/w{w}/N{n}"] = [spec.tokens == plain.tokens, round(spec.acceptance_rate, 3)]
            bf16 = PlainDecoding(model.to(torch.bfloat16), UniformPolicy(0.5)).generate(prompts, new)
            identical[f"{family}/bf16_tokens"] = [bf16.new_tokens == count * new, None]
    worst = max(errors.values())
    ok = worst <= TOLERANCE[torch.float32] and all(v[0] for v in identical.values())
    return result(ok, f"cached logits vs full forward, fp32, worst relative error {worst:.1e} over "
                  f"{len(errors)} family/policy pairs; greedy self-speculative == plain: "
                  f"{sum(v[0] for v in identical.values())}/{len(identical)}", errors=errors, identical=identical)


# --------------------------------------------------------------------------- driver

CHECKS = {"environment": check_environment, "grouped_mm": check_grouped_mm, "moe_vs_cpu": check_moe_vs_cpu,
          "host_syncs": check_host_syncs, "bench_moe": check_bench_moe, "bench_attention": check_bench_attention,
          "train_resume": check_train_resume, "deepseek": check_deepseek, "decoding": check_decoding}


def run_check(fn, ctx) -> dict:
    """One check, isolated: an exception is a FAIL with its first line (the traceback on stderr)."""
    start = time.perf_counter()
    try:
        r = fn(ctx)
    except Exception as e:                                              # noqa: BLE001  (a failure is a result)
        traceback.print_exc()
        r = result(False, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
    gc.collect()
    if torch.cuda.is_initialized():
        with contextlib.suppress(RuntimeError):    # after a CUDA error the next checks say so themselves
            torch.cuda.empty_cache()
    return {**r, "seconds": round(time.perf_counter() - start, 2)}


def context(smoke: bool, tmp: str) -> argparse.Namespace:
    """The device (CUDA, or the CPU with --smoke), dtype, sizes and the device's bf16 peak."""
    from mose_ds import engine as engine_lib
    from mose_ds.train import quiet_libraries
    quiet_libraries()
    device = engine_lib.init_distributed(device="cpu" if smoke else "cuda")
    cuda, dtype = device.type == "cuda", torch.float32 if smoke else torch.bfloat16
    name = torch.cuda.get_device_name(device) if cuda else f"cpu x{torch.get_num_threads()} threads"
    return argparse.Namespace(smoke=smoke, tmp=tmp, device=device, dtype=dtype, dtype_name=str(dtype)[6:],
                              sizes=SIZES["smoke" if smoke else "gpu"], device_name=name,
                              capability=".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
                              peak=next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None) if cuda else None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mose_ds.commands.gpu_check", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("runs", "gpu_check", "gpu_check.json"), help="JSON results")
    p.add_argument("--smoke", action="store_true", help="the same checks on the CPU at toy sizes")
    p.add_argument("--only", nargs="+", choices=list(CHECKS), default=None, help="run these checks only")
    args = p.parse_args(argv)
    mode, start, results = "smoke" if args.smoke else "gpu", time.perf_counter(), {}
    report = os.fdopen(os.dup(1), "w", buffering=1)          # the check lines; library chatter goes to stderr
    with report, stdout_to_stderr(), tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        try:
            ctx, names = context(args.smoke, tmp), list(args.only or CHECKS)
        except Exception as e:                                          # noqa: BLE001  (no device, no checks)
            results["environment"], names = result(False, f"{type(e).__name__}: {e}", seconds=0.0), []
            print(f"FAIL  {'environment':<15} {results['environment']['summary']}", file=report)
        for name in names:
            r = results[name] = run_check(CHECKS[name], ctx)
            print(f"{r['status']:<4}  {name:<15} {r['summary']} ({r['seconds']:.1f} s)", file=report)
        total, failed = time.perf_counter() - start, [n for n, r in results.items() if r["status"] == "FAIL"]
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"mode": mode, "device": ctx.device_name if names else None, "checks": results, "failed": failed,
                       "seconds": round(total, 1), "budget_s": BUDGET_S[mode]}, f, indent=1, default=str)
        over = " (OVER BUDGET)" if total > BUDGET_S[mode] else ""
        print(f"total {total:.1f} s of a {BUDGET_S[mode]} s budget{over} ({mode}); {len(failed)} of {len(results)} "
              f"checks failed; JSON: {os.path.abspath(args.out)}", file=report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
