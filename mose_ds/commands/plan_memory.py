#!/usr/bin/env python
"""Per-GPU memory of a recipe on a cluster shape, and whether it fits (mose_ds/memory.py).

    mose-plan-memory ds_configs/gpt2_large_e8a2.yaml --nodes 2 --gpus-per-node 8 \\
        --gpu-memory-gib 96 [--zero-stage 2] [--ep 4] [--micro-batch 4] [--seq-len 1024] \\
        [--activation-checkpointing on|off] [--json] [key=value ...]
    mose-plan-memory RECIPE --table --gpus 8,16,32 --gpu-memory-gib 96,192
    mose-plan-memory --measure [--json]

The plan splits each GPU's bytes into weights, gradients, optimizer state (fp32 master and
Adam moments; non-expert state partitioned over data parallel, expert state over the
expert-data-parallel group), activations and gradient-reduction buffers, and reports the
peak of an iteration against the GPU's memory less a reserve (`--reserve`, default 10%:
CUDA context, NCCL, allocator fragmentation). Parameter counts come from the model built on
the meta device. Each plan also shows DeepSpeed's own ZeRO-2 model-state estimate for the
non-expert parameters next to ours in DeepSpeed's setting (16-bit gradients).

`--measure` checks the plan against reality: short training runs of small models on CPU
ranks (gloo) under the DeepSpeed engine, each rank's peak resident memory minus its
resident memory before the model was built, less the same for a near-empty model (the fixed
cost of the engine and process group), next to the plan for the same run (attention is the
same fused kernel on CPU and GPU). The ranks run with `MALLOC_MMAP_THRESHOLD_=65536`, so freed tensors go back to
the system and the resident peak follows the live tensors (as a GPU allocator's peak does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile

from mose_ds.config import ConfigError, apply_overrides, from_dict, load_config
from mose_ds.memory import GiB, Cluster, ParamCounts, model_states, plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository

# --------------------------------------------------------------------------- planning


def param_counts(cfg) -> ParamCounts:
    """Non-expert and routed-expert parameters of the recipe's model (meta device)."""
    from mose_ds.model import model_info
    info = model_info(cfg)
    return ParamCounts(non_expert=info["params_total"] - info["params_experts"], expert=info["params_experts"])


def grad_accum_dtype(cfg) -> str:
    """The gradient-accumulation dtype of the DeepSpeed config the trainer would build."""
    import dataclasses
    from mose_ds.engine import deepspeed_config
    # the batch geometry does not matter here, and a planned cluster is not this process's world
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch_size=None))
    return deepspeed_config(cfg).get("data_types", {}).get("grad_accum_dtype", cfg.engine.precision)


def deepspeed_zero2_estimate(params: int, gpus_per_node: int, nodes: int) -> int:
    """DeepSpeed's ZeRO-2 model-state estimate per GPU (no offload): 2P + 18P / W bytes
    (16-bit weights; 16- and 32-bit gradients, fp32 master and Adam moments partitioned)."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    return estimate_zero2_model_states_mem_needs(params, gpus_per_node, nodes, cpu_offload=False)[1]


def dense_cross_check(cfg, counts: ParamCounts, cluster: Cluster) -> dict:
    """Our model states of the non-expert parameters under ZeRO-2 with 16-bit gradients next
    to DeepSpeed's estimator for the same parameters and GPUs."""
    dense = ParamCounts(counts.non_expert, 0)
    s = model_states(dense, cluster.world, 1, 2, "bf16", "bf16")
    ours = s["weights"] + s["gradients_step"] + s["optimizer"]
    theirs = deepspeed_zero2_estimate(dense.total, cluster.gpus_per_node, cluster.nodes)
    return {"params": dense.total, "ours": ours, "deepspeed": theirs, "ratio": ours / theirs}


def shape_overrides(args) -> list[str]:
    """The cluster-shape flags as config overrides (they win over key=value overrides)."""
    out = []
    for flag, key in (("zero_stage", "engine.zero_stage"), ("ep", "moe.expert_parallel_size"),
                      ("micro_batch", "train.micro_batch_size"), ("seq_len", "model.seq_len"),
                      ("activation_checkpointing", "train.activation_checkpointing"),
                      ("precision", "engine.precision")):
        value = getattr(args, flag)
        if value is not None:
            out.append(f"{key}={'true' if value == 'on' else 'false' if value == 'off' else value}")
    return out


def gib(x: float) -> str:
    return f"{x / GiB:.1f}"


PARTS = (("weights", "weights"), ("grads", "gradients_backward"), ("optimizer", "optimizer"),
         ("activations", "activations"), ("buffers", "buffers"))


def print_plan(p: dict, check: dict) -> None:
    print(f"{p['world']} GPUs ({p['nodes']} x {p['gpus_per_node']}), EP {p['expert_parallel']}, "
          f"ZeRO-{p['zero_stage']} {p['precision']} ({p['optimizer_path']}), micro-batch {p['micro_batch']} "
          f"x {p['seq_len']}, activation checkpointing {'on' if p['activation_checkpointing'] else 'off'}")
    for label, key in PARTS:
        print(f"  {label:<22} {gib(p[key]):>8} GiB")
    print(f"  {'backward peak':<22} {gib(p['backward_peak']):>8} GiB")
    print(f"  {'optimizer-step peak':<22} {gib(p['step_peak']):>8} GiB  (gradients "
          f"{gib(p['gradients_step'])} + step temporary {gib(p['step_temporary'])})")
    if p["expert_stacks"]:
        print(f"  {'grouped-kernel stacks':<22} {gib(p['expert_stacks']):>8} GiB  (a transient copy of one layer's "
              "expert weights, in the backward peak: no ZeRO flat buffer to view)")
    if p["moe_layer"]:
        m = p["moe_layer"]
        print(f"  one MoE layer's forward: keeps {m['saved'] / 2**20:,.0f} MiB for backward, peaks at "
              f"{m['peak'] / 2**20:,.0f} MiB (+ {m['transient'] / 2**20:,.0f} MiB of exchange or combine buffers)")
    verdict = "fits" if p["fits"] else "DOES NOT FIT"
    print(f"  {'peak':<22} {gib(p['peak']):>8} GiB of {gib(p['usable'])} usable "
          f"({gib(p['gpu_memory'])} GiB less reserve): {verdict}")
    print(f"  dense cross-check: ZeRO-2 model states of the {check['params'] / 1e6:,.0f}M non-expert parameters "
          f"{gib(check['ours'])} GiB, DeepSpeed's estimator {gib(check['deepspeed'])} GiB "
          f"(ratio {check['ratio']:.3f})")


def table_rows(cfg, counts: ParamCounts, gpus: list[int], memories: list[float], gpus_per_node: int,
               reserve: float, accum: str) -> list[dict]:
    rows = []
    for n in gpus:
        per_node = min(gpus_per_node, n)
        if n % per_node:
            raise ValueError(f"{n} GPUs are not whole nodes of {per_node}")
        for mem in memories:
            rows.append(plan(cfg, counts, Cluster(n // per_node, per_node, mem), accum, reserve))
    return rows


def print_table(name: str, counts: ParamCounts, rows: list[dict]) -> None:
    print(f"{name}: {counts.total / 1e9:.2f}B parameters ({counts.expert / 1e9:.2f}B in routed experts); "
          f"GiB per GPU")
    header = "| GPUs | GPU GiB | EP | " + " | ".join(label for label, _ in PARTS) + " | peak | usable | fits |"
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for p in rows:
        parts = " | ".join(gib(p[key]) for _, key in PARTS)
        print(f"| {p['world']} | {gib(p['gpu_memory'])} | {p['expert_parallel']} | {parts} | {gib(p['peak'])} | "
              f"{gib(p['usable'])} | {'yes' if p['fits'] else 'no'} |")


# --------------------------------------------------------------------------- measuring

BASE = {
    "model": {"name": "mem-gpt2", "num_layers": 4, "num_heads": 4, "hidden_size": 256, "vocab_size": 8192,
              "seq_len": 256},
    "moe": {"num_experts": 8, "top_k": 2},
    "mose": {"enabled": True, "width_max": 1.0},
    "train": {"micro_batch_size": 4, "grad_accum_steps": 2},
    "engine": {"zero_stage": 1, "precision": "fp32", "reduce_bucket_size": 2_000_000,
               "allgather_bucket_size": 2_000_000},
    "logging": {"tensorboard": False},
}
NULL_MODEL = {"name": "mem-null", "num_layers": 1, "num_heads": 2, "hidden_size": 16, "vocab_size": 256,
              "seq_len": 16, "moe_every": 1}
DEEPSEEK_TINY = os.path.join(ROOT, "ds_configs", "hf", "tiny_deepseek_v2", "config.json")

# (name, ranks, overrides of BASE); "deepseek" cases take the tiny DeepSeek-V2 architecture
# widened to a measurable size instead of BASE's GPT-2 model
CASES = (
    ("gpt2 fp32 ZeRO-1 joint", 1, []),
    ("gpt2 fp32 ZeRO-2 EP=2 joint", 2, ["engine.zero_stage=2", "moe.expert_parallel_size=2"]),
    ("gpt2 bf16 ZeRO-1 recompute sequential", 1, ["engine.precision=bf16", "train.activation_checkpointing=true",
                                                  "mose.two_pass=sequential"]),
    ("gpt2 fp32 ZeRO-0 no MoSE", 1, ["engine.zero_stage=0", "mose.enabled=false", "train.micro_batch_size=8"]),
    ("deepseek bf16 ZeRO-2 dropless", 1, ["engine.precision=bf16", "engine.zero_stage=2",
                                          "moe.drop_tokens=false", "model.seq_len=128"]),
)


def case_raw(name: str, overrides: list[str]) -> dict:
    raw = apply_overrides(json.loads(json.dumps(BASE)), overrides)
    if name.startswith("deepseek"):
        from mose_ds.deepseek import read_hf_config
        hf = read_hf_config(DEEPSEEK_TINY)
        hf.update(hidden_size=256, intermediate_size=1024, moe_intermediate_size=256, num_attention_heads=4,
                  kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, vocab_size=8192)
        raw["model"] = {"name": "mem-deepseek", "hf": hf, "seq_len": raw["model"]["seq_len"]}
        for key in ("num_experts", "top_k"):      # fixed by the architecture
            raw["moe"].pop(key)
    return raw


def null_raw(raw: dict) -> dict:
    null = json.loads(json.dumps(raw))
    null["model"] = dict(NULL_MODEL)
    null["moe"] = {"num_experts": raw["moe"].get("expert_parallel_size", 1) * 2, "top_k": 1,
                   "expert_parallel_size": raw["moe"].get("expert_parallel_size", 1)}
    null["train"]["micro_batch_size"] = 1
    return null


def worker(raw_json: str, out: str, iterations: int = 2) -> None:
    """One rank of a measured run: peak resident bytes above the pre-model baseline."""
    import resource

    import deepspeed.runtime.bf16_optimizer  # noqa: F401  (imported before the baseline)
    import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401
    import torch
    from deepspeed import comm as dist

    from mose_ds import engine as engine_lib
    from mose_ds.train import quiet_libraries, train_micro_batch

    quiet_libraries()
    engine_lib.init_distributed(device="cpu")     # a CPU measurement, on any host
    from mose_ds.measure import resident
    cfg = from_dict(json.loads(raw_json))
    base = resident()
    engine = engine_lib.create_engine(cfg, engine_lib.build_model(cfg))
    gen = torch.Generator().manual_seed(dist.get_rank())
    width = cfg.mose.width_max if cfg.mose.enabled else None
    for _ in range(iterations):
        for _ in range(engine_lib.accumulation(cfg)):
            x = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.model.seq_len + 1),
                              generator=gen)
            train_micro_batch(engine, cfg, x[:, :-1], x[:, 1:], width)
    rise = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base], dtype=torch.float64)
    dist.all_reduce(rise, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"rise": rise.item()}, f)
    dist.barrier()


def measured_rise(raw: dict, ranks: int) -> float:
    """The largest per-rank resident rise of a run on `ranks` CPU ranks."""
    from mose_ds.engine import child_env, free_port
    env = child_env()
    env.update(MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rise.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
               f"--master_port={free_port()}", "-m", __spec__.name, "--worker", json.dumps(raw), out]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if result.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"measured run failed:\n{result.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)["rise"]


def measure_case(name: str, ranks: int, overrides: list[str]) -> dict:
    """Plan and measurement of one case, both net of the near-empty model's."""
    raw = case_raw(name, overrides)
    results = {}
    for label, r in (("case", raw), ("null", null_raw(raw))):
        cfg = from_dict(r)
        counts = param_counts(cfg)
        planned = plan(cfg, counts, Cluster(1, ranks, 1024.0), grad_accum_dtype(cfg))
        results[label] = (planned["peak"], measured_rise(r, ranks))
    planned = results["case"][0] - results["null"][0]
    measured = results["case"][1] - results["null"][1]
    return {"case": name, "ranks": ranks, "planned": planned, "measured": measured, "ratio": planned / measured,
            "overhead": results["null"][1]}


def run_measure(as_json: bool, names: list[str] | None = None) -> int:
    rows = []
    cases = [c for c in CASES if not names or c[0] in names]
    for i, (name, ranks, overrides) in enumerate(cases):
        if not as_json:
            print(f"[{i + 1}/{len(cases)}] {name} on {ranks} CPU rank(s) ...", flush=True)
        rows.append(measure_case(name, ranks, overrides))
    if as_json:
        print(json.dumps(rows))
        return 0
    print("| run | ranks | planned MiB | measured MiB | planned / measured |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['ranks']} | {r['planned'] / 2**20:.0f} | {r['measured'] / 2**20:.0f} | "
              f"{r['ratio']:.3f} |")
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"measured {len(rows)} run(s); largest deviation of the plan {100 * worst:.1f}% "
          f"(fixed engine cost subtracted: {max(r['overhead'] for r in rows) / 2**20:.0f} MiB at most)")
    return 0


# --------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mose-plan-memory", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gib", default="80", help="GiB per GPU (a list with --table)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2))
    p.add_argument("--ep", type=int, help="expert-parallel size")
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--precision", choices=("bf16", "fp32"))
    p.add_argument("--activation-checkpointing", choices=("on", "off"))
    p.add_argument("--reserve", type=float, default=0.1, help="fraction of GPU memory not planned for")
    p.add_argument("--table", action="store_true", help="one row per GPU count and memory size")
    p.add_argument("--gpus", default="8,16,32", help="GPU counts of --table")
    p.add_argument("--measure", action="store_true", help="plan vs. measured small CPU runs")
    p.add_argument("--case", action="append", help="with --measure: only this case (repeatable)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    with contextlib.redirect_stdout(sys.stderr):   # library chatter (DeepSpeed binds its logger
        from mose_ds.train import quiet_libraries    # to the stream at import) goes to stderr
        quiet_libraries()
    if args.measure:
        unknown = set(args.case or ()) - {c[0] for c in CASES}
        if unknown:
            print(f"error: --case {sorted(unknown)[0]!r}: expected one of {', '.join(c[0] for c in CASES)}",
                  file=sys.stderr)
            return 2
        return run_measure(args.json, args.case)
    if not args.config:
        print("error: a recipe (or --measure) is required", file=sys.stderr)
        return 2
    try:
        memories = [float(x) for x in args.gpu_memory_gib.split(",")]
        gpus = [int(x) for x in args.gpus.split(",")]
        if min(memories) <= 0 or min(gpus) <= 0 or args.nodes <= 0 or args.gpus_per_node <= 0:
            raise ValueError("GPU counts and memory sizes must be positive")
        if not 0 <= args.reserve < 1:
            raise ValueError(f"--reserve {args.reserve}: expected a fraction in [0, 1)")
        with contextlib.redirect_stdout(sys.stderr):
            cfg = load_config(args.config, args.overrides + shape_overrides(args))
            counts = param_counts(cfg)
            accum = grad_accum_dtype(cfg)
        if args.table:
            rows = table_rows(cfg, counts, gpus, memories, args.gpus_per_node, args.reserve, accum)
        else:
            cluster = Cluster(args.nodes, args.gpus_per_node, memories[0])
            rows = [plan(cfg, counts, cluster, accum, args.reserve)]
            check = dense_cross_check(cfg, counts, cluster)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        out = rows if args.table else {**rows[0], "dense_cross_check": check}
        print(json.dumps(out))
    elif args.table:
        print_table(cfg.model.name, counts, rows)
    else:
        print_plan(rows[0], check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
