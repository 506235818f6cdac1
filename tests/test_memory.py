"""The memory planner: model-state arithmetic on hand-computed cases, the activation count
against the tensors autograd really keeps, DeepSpeed's ZeRO-2 estimator, measured CPU runs,
and the command line."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, clean_env
from mose_ds.config import from_dict
from mose_ds.memory import ParamCounts, activation_shape, activations, model_states
from mose_ds.model import MoSEGPT, lm_loss
from mose_ds.widths import UniformPolicy

TOOL = ("-m", "mose_ds.commands.plan_memory")
TINY_DEEPSEEK = os.path.join(ROOT, "ds_configs", "hf", "tiny_deepseek_v2", "config.json")


def test_model_states_by_hand():
    # 1000 non-expert + 8000 expert parameters; 8 GPUs, EP 4: each GPU holds 1000 + 2000,
    # its optimizer owns (1000 + 8000) / 8 = 1125.
    c = ParamCounts(non_expert=1000, expert=8000)
    z2 = model_states(c, world=8, ep=4, zero_stage=2, precision="bf16", grad_accum_dtype="fp32")
    assert z2 == {"weights": 6000, "gradients_backward": 4500, "gradients_step": 4500,
                  "optimizer": 13500, "step_temporary": 4500}
    z2_16 = model_states(c, 8, 4, 2, "bf16", "bf16")      # 16-bit buffer + fp32 copy at the step
    assert (z2_16["gradients_backward"], z2_16["gradients_step"]) == (2250, 2250 + 4500)
    bf16_opt = model_states(c, 8, 4, 1, "bf16", "fp32")   # fp32 accumulators + bf16 grads, unpartitioned
    assert (bf16_opt["gradients_backward"], bf16_opt["optimizer"]) == (6 * 3000, 13500)
    z0 = model_states(c, 1, 1, 0, "fp32", "fp32")
    assert z0 == {"weights": 36000, "gradients_backward": 36000, "gradients_step": 36000,
                  "optimizer": 72000, "step_temporary": 36000}


@pytest.mark.parametrize("gpus_per_node,nodes", [(1, 1), (8, 1), (8, 4)])
def test_dense_part_matches_deepspeed_estimator(gpus_per_node, nodes):
    from mose_ds.commands.plan_memory import deepspeed_zero2_estimate
    world = gpus_per_node * nodes
    for params in (125_000_000, 1_300_000_000, 6_700_000_000):
        s = model_states(ParamCounts(params, 0), world, 1, 2, "bf16", "bf16")
        ours = s["weights"] + s["gradients_step"] + s["optimizer"]
        theirs = deepspeed_zero2_estimate(params, gpus_per_node, nodes)
        assert abs(ours / theirs - 1) < 0.05, (params, world, ours, theirs)


def saved_tensor_bytes(cfg, batch: int, width: float, dtype: torch.dtype) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for one forward + loss."""
    model = MoSEGPT(cfg.model, cfg.moe, bf16=dtype == torch.bfloat16)
    model.init_weights(0)
    model = model.to(dtype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    tokens = torch.randint(0, cfg.model.vocab_size, (batch, cfg.model.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, _ = model(tokens, UniformPolicy(width))
        lm_loss(logits, tokens)
    return sum(kept.values())


@pytest.mark.parametrize("family,seq,batch,experts,drop,width,precision", [
    ("gpt2", 64, 2, 4, False, 1.0, "fp32"),
    ("gpt2", 128, 2, 8, True, 0.5, "fp32"),
    ("gpt2", 64, 4, 8, False, 0.3, "bf16"),
    ("deepseek", 64, 2, 8, False, 1.0, "fp32"),
    ("deepseek", 64, 4, 8, True, 0.3, "bf16"),
])
def test_activation_count_matches_autograd(world, family, seq, batch, experts, drop, width, precision):
    if family == "gpt2":
        cfg = from_dict({"model": {"num_layers": 4, "num_heads": 4, "hidden_size": 128, "vocab_size": 1000,
                                   "seq_len": seq}, "moe": {"num_experts": experts, "top_k": 2, "drop_tokens": drop}})
    else:
        cfg = from_dict({"model": {"hf_config": TINY_DEEPSEEK, "seq_len": seq}, "moe": {"drop_tokens": drop}})
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    got = saved_tensor_bytes(cfg, batch, width, dtype)
    planned = activations(activation_shape(cfg.model, cfg.moe), batch, seq, precision, (width,), False)["saved"]
    assert abs(planned / got - 1) < 0.03, (planned, got)


def test_activation_checkpointing_and_two_pass_shrink_the_plan():
    cfg = from_dict({"model": {"num_layers": 12, "num_heads": 12, "hidden_size": 768, "vocab_size": 50304,
                               "seq_len": 1024}})
    shape = activation_shape(cfg.model, cfg.moe)
    joint = activations(shape, 4, 1024, "bf16", (1.0, 1.0), False)["saved"]
    single = activations(shape, 4, 1024, "bf16", (1.0,), False)["saved"]
    recompute = activations(shape, 4, 1024, "bf16", (1.0,), True)["saved"]
    head = activations(dataclasses.replace(shape, num_layers=0, moe_layers=0), 4, 1024, "bf16", (1.0,), False)["saved"]
    assert joint == pytest.approx(2 * single)
    assert recompute - head < (single - head) / 4      # the blocks' part; the head is kept either way


def test_grouped_stacks_are_planned_only_without_zero_one_layer_at_a_time():
    """Without a ZeRO flat buffer a layer's forward and backward each copy its expert weights
    for their own use: one layer's local experts at a time; under ZeRO-1/2 the stacks are
    views (nothing), and `auto` in fp32 runs the loop."""
    from mose_ds.memory import grouped_stack_bytes
    c = ParamCounts(non_expert=1000, expert=8000)
    assert grouped_stack_bytes(c, 2, 0, "fp32", "grouped") == 4 * 4000
    assert grouped_stack_bytes(c, 2, 0, "fp32", "grouped", moe_layers=4) == 4 * 1000
    assert grouped_stack_bytes(c, 2, 1, "bf16", "grouped", 4) == 0
    assert grouped_stack_bytes(c, 2, 0, "fp32", "auto", 4) == 0


def run_tool(*args, timeout=600):
    return subprocess.run([sys.executable, *TOOL, *args], capture_output=True, text=True, cwd=ROOT,
                          env=clean_env(), timeout=timeout)


def test_plan_cli_and_bad_input():
    out = run_tool("ds_configs/gpt2_large_e8a2.yaml", "--nodes", "2", "--gpus-per-node", "8",
                   "--gpu-memory-gib", "96", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    plan = json.loads(out.stdout)
    assert (plan["world"], plan["expert_parallel"], plan["optimizer_path"]) == (16, 4, "zero2")
    assert plan["fits"] and plan["peak"] == max(plan["backward_peak"], plan["step_peak"])
    assert abs(plan["dense_cross_check"]["ratio"] - 1) < 0.05
    # the same recipe without activation checkpointing needs more activation memory
    off = json.loads(run_tool("ds_configs/gpt2_large_e8a2.yaml", "--nodes", "2", "--gpu-memory-gib", "96",
                              "--activation-checkpointing", "off", "--json").stdout)
    assert off["activations"] > 3 * plan["activations"]

    bad = run_tool("ds_configs/gpt2_large_e8a2.yaml", "--ep", "3")
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode == 2 and len(errors) == 1 and "expert_parallel_size=3" in errors[0]
    bad = run_tool("ds_configs/gpt2_large_e8a2.yaml", "--table", "--gpus", "12")
    assert bad.returncode == 2 and "12 GPUs" in bad.stderr
    bad = run_tool("--measure", "--case", "nope")
    assert bad.returncode == 2 and "'nope'" in bad.stderr


def test_plan_agrees_with_measured_cpu_runs():
    """Peak resident memory of real 1- and 2-rank CPU training runs within 15% of the plan."""
    out = run_tool("--measure", "--case", "gpt2 fp32 ZeRO-1 joint", "--case", "gpt2 fp32 ZeRO-2 EP=2 joint",
                   "--json", timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout)
    assert len(rows) == 2
    for row in rows:
        assert row["measured"] > 100 * 2**20, row      # the runs are big enough to measure
        assert abs(row["ratio"] - 1) < 0.15, row
