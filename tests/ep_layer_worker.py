"""Run under torchrun by test_distributed.py on 2 ranks: the MoE layer with expert parallelism
(EP=2, two experts per rank) against the one-rank layer holding every expert, for each expert
kernel, activation, shared-expert mode, capacity mode and width policy; and the bytes every
all-to-all sends. Rank 0 writes the largest relative difference of each case and the exchanges' bytes.

Each rank routes its own half of a fixed batch. The one-rank reference runs each half
separately (capacity is per rank's tokens), so the EP layer's output, input gradient, router
and shared-expert gradients must equal the reference's on the same half, and each expert's
gradient the reference's summed over both halves."""

import itertools
import json
import os
import sys
import zlib

import torch  # noqa: E402

from conftest import tiny_config  # noqa: E402
from deepspeed import comm as dist  # noqa: E402
from mose_ds import engine as engine_lib  # noqa: E402
from mose_ds.counters import AllToAllLog  # noqa: E402
from mose_ds.model import global_expert_name, transformer_config  # noqa: E402
from mose_ds.moe_layer import SlimmableMoE  # noqa: E402
from mose_ds.widths import NormProbPolicy, UniformPolicy  # noqa: E402

D, E, SEQ, BATCH, RANKS = 32, 4, 8, 4, 2
POLICIES = {"uniform": (UniformPolicy(0.5), False), "per-token": (NormProbPolicy(0.9), False),
            "relaxed": (NormProbPolicy(0.9), True)}


def build(ep: int, kernel: str, activation: str, shared: str, drop: bool) -> SlimmableMoE:
    cfg = tiny_config(model={"activation": activation},
                      moe={"num_experts": E, "top_k": 2, "expert_parallel_size": ep, "expert_kernel": kernel,
                           "drop_tokens": drop, "capacity_factor": 1.25, "min_capacity": 0,
                           "shared_slimmable": shared == "slimmable"})
    layer = SlimmableMoE(transformer_config(cfg.model), cfg.moe, 4 * D, activation, 0,
                         shared_hidden_size=0 if shared == "none" else 2 * D)
    layer.set_deepspeed_parallelism()
    rank = dist.get_rank() if ep > 1 else 0
    with torch.no_grad():
        for name, param in layer.named_parameters():
            gen = torch.Generator().manual_seed(zlib.crc32(global_expert_name(name, rank, E // ep).encode()))
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return layer.train()


def run(layer, x_SBD, g_SBD, policy, relaxed):
    """Output, gradients (input, then each parameter by name) and the routed slots kept."""
    x_SBD = x_SBD.clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    out, info = layer(x_SBD, policy, relaxed)
    torch.autograd.backward([out, info.aux_loss], [g_SBD, torch.ones(())])
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    kept = round(float(x_SBD.shape[0] * x_SBD.shape[1] * layer.k * (1 - info.stats.dropped_frac)))
    return out.detach(), x_SBD.grad, grads, kept


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference over the reference's largest magnitude."""
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def case(kernel, activation, shared, drop, policy_name, x_SBD, g_SBD) -> dict:
    rank, L = dist.get_rank(), E // RANKS
    policy, relaxed = POLICIES[policy_name]
    halves = [(x_SBD[:, r::RANKS], g_SBD[:, r::RANKS]) for r in range(RANKS)]
    with AllToAllLog() as log:
        out, dx, grads, kept = run(build(RANKS, kernel, activation, shared, drop), *halves[rank], policy, relaxed)
    ref_layer = build(1, kernel, activation, shared, drop)
    refs = [run(ref_layer, x, g, policy, relaxed) for x, g in halves]
    worst = max(relative_error(out, refs[rank][0]), relative_error(dx, refs[rank][1]))
    for name, grad in grads.items():
        glob = global_expert_name(name, rank, L)
        want = sum(r[2][glob] for r in refs) if "deepspeed_experts" in name else refs[rank][2][glob]
        worst = max(worst, relative_error(grad, want))
    rows = kept * D * out.element_size()             # this rank's kept slots, as rows of the layer
    return {"case": "/".join((kernel, activation, shared, "dropless" if not drop else "capacity", policy_name)),
            "worst": worst, "sent": log.sent, "kept_bytes": rows}


def main(out_path: str) -> None:
    engine_lib.init_distributed()
    gen = torch.Generator().manual_seed(0)
    x_SBD, g_SBD = torch.randn(SEQ, BATCH, D, generator=gen), torch.randn(SEQ, BATCH, D, generator=gen)
    results = [case(*combo, x_SBD, g_SBD) for combo in itertools.product(
        ("loop", "grouped"), ("gelu", "swiglu"), ("none", "full", "slimmable"), (False, True), POLICIES)]
    gathered = [None] * RANKS
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
