"""Run under torchrun by test_distributed.py: one step (expert kernel as given) on this rank's
shard of a fixed global batch through three branches (full width, a sampled uniform width, per-token widths from the
normalised-probability policy); rank 0 writes the mean LM losses, the full gradients
(experts by global index) and the widths every rank sampled."""

import os
import re
import sys

import torch  # noqa: E402

from conftest import tiny_config  # noqa: E402
from deepspeed import comm as dist  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402
from mose_ds import engine as engine_lib  # noqa: E402
from mose_ds.train import branch_loss  # noqa: E402
from mose_ds.widths import FULL_WIDTH, NormProbPolicy, UniformPolicy, sample_width  # noqa: E402

GLOBAL_BATCH = 4


def main(out: str, ep: int, zero: int, kernel: str) -> None:
    engine_lib.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_config(moe={"expert_parallel_size": ep, "drop_tokens": False, "load_balance_coef": 0.0,
                           "expert_kernel": kernel},
                      engine={"zero_stage": zero}, train={"micro_batch_size": GLOBAL_BATCH // world})
    model = engine_lib.build_model(cfg)
    engine = engine_lib.create_engine(cfg, model)

    tokens = torch.randint(0, 4096, (GLOBAL_BATCH, 33), generator=torch.Generator().manual_seed(0))
    shard = tokens.chunk(world)[rank]
    widths = [sample_width(cfg.mose.grid, step, cfg.train.seed) for step in range(50)]
    full, lm_full, _ = branch_loss(engine, shard[:, :-1], shard[:, 1:], FULL_WIDTH)
    narrow, lm_narrow, _ = branch_loss(engine, shard[:, :-1], shard[:, 1:], UniformPolicy(widths[0]))
    per_token, lm_per_token, _ = branch_loss(engine, shard[:, :-1], shard[:, 1:], NormProbPolicy(0.9))
    engine.backward((full + narrow + per_token) / 3)

    lm = torch.tensor([lm_full.item(), lm_narrow.item(), lm_per_token.item()], dtype=torch.float64)
    dist.all_reduce(lm)
    expert_rank = rank % ep
    grads = {}
    for name, param in engine.module.named_parameters():
        grad = safe_get_full_grad(param).detach().clone().float()
        match = re.search(r"deepspeed_experts\.(\d+)\.", name)
        if match:
            global_id = expert_rank * (cfg.moe.num_experts // ep) + int(match.group(1))
            name = name[:match.start(1)] + str(global_id) + name[match.end(1):]
        grads[name] = grad
    gathered = [None] * world
    dist.all_gather_object(gathered, {"grads": grads, "widths": widths})
    if rank == 0:
        merged = {}
        for part in gathered:
            merged.update(part["grads"])
        torch.save({"lm": (lm / world).tolist(), "grads": merged,
                    "widths": [p["widths"] for p in gathered]}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
