"""Run under torchrun by test_deepseek.py: build the DeepSeek-V2 model from a converted
weights folder with expert_parallel_size = world size, load this rank's experts, and (rank 0)
save the full-width logits of a fixed batch."""

import os
import sys

import torch  # noqa: E402

from deepspeed import comm as dist  # noqa: E402
from mose_ds import checkpoint, engine as engine_lib  # noqa: E402
from mose_ds.config import from_dict, to_dict  # noqa: E402


def main(weights: str, out: str) -> None:
    engine_lib.init_distributed()
    raw = to_dict(checkpoint.checkpoint_config(weights))
    raw["moe"].update(expert_parallel_size=dist.get_world_size(), drop_tokens=False)
    cfg = from_dict(raw)
    model = engine_lib.build_model(cfg).eval()
    checkpoint.load_weights(model, weights, engine_lib.expert_rank(model))
    tokens = torch.randint(0, cfg.model.vocab_size, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = model(tokens)
    if dist.get_rank() == 0:
        torch.save(logits, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
