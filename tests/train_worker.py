"""Run under torchrun by the tests: `mose_ds.train.train` on a recipe with overrides, then
rank 0 writes what the engine holds at the end: the optimizer wrapper DeepSpeed chose, the
per-iteration losses, and DeepSpeed's own assembly (its fragment API, not our checkpoint
reader) of every fp32 master weight and both Adam moments, experts under global names.

    torchrun --nproc_per_node N tests/train_worker.py OUT.pt RECIPE.yaml [key=value ...]
"""

import os
import sys

import torch  # noqa: E402
from deepspeed import comm as dist  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: E402

from mose_ds import engine as engine_lib  # noqa: E402
from mose_ds.config import load_config  # noqa: E402
from mose_ds.train import quiet_libraries, train  # noqa: E402

KINDS = ("weights", "exp_avg", "exp_avg_sq")


def full_state(engine) -> dict:
    """{kind: {global name: fp32 tensor}} of this rank's parameters (ZeRO-1/2 or bf16).
    Collective: the fragments of a parameter are summed over its ZeRO partition group."""
    # DeepSpeed's ZeRO-1/2 optimizer steps its groups one at a time and links the moment
    # fragments after the first group's step, when the other groups have no state yet:
    # link again now that all have it (BF16_Optimizer links after one step of all groups).
    engine.optimizer._hp_optimizer_states_linked = False
    engine.optimizer._lazy_init_hp_params_optimizer_state()
    out = {kind: {} for kind in KINDS}
    for name, param in engine.module.global_parameters(engine_lib.expert_rank(engine.module)):
        out["weights"][name] = safe_get_full_fp32_param(param).clone()
        for moment in KINDS[1:]:
            out[moment][name] = safe_get_full_optimizer_state(param, moment).clone()
    return out


def main(out: str, recipe: str, *overrides: str) -> None:
    quiet_libraries()
    summary = train(load_config(recipe, list(overrides)), quiet=True)
    engine = summary["engine"]
    state = full_state(engine)
    parts = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(parts, state)
    if dist.get_rank() == 0:
        merged = {kind: {n: t for p in parts for n, t in p[kind].items()} for kind in KINDS}
        wrapper = type(engine.optimizer)
        torch.save({"optimizer": f"{wrapper.__module__}.{wrapper.__qualname__}",
                    "losses": [h["loss_full"] for h in summary["history"]],
                    "iteration": summary["state"].iteration, **merged}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
