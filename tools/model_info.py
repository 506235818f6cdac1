#!/usr/bin/env python
"""Parameter counts of a recipe's model, built on the meta device (no memory, no weights).

    python tools/model_info.py ds_configs/gpt2_small_e8a2.yaml [--json] [key=value ...]

`params_total` counts tied embeddings once; `params_active_per_token` keeps k of the E
experts of every MoE layer (what one token runs through at full width). `mflops_per_token` is
the forward compute of one token at full width over a full `seq_len` context, in the paper's
and the standard convention (mose_ds/flops.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mose_ds.config import ConfigError, load_config  # noqa: E402


def model_info(cfg) -> dict:
    from mose_ds import engine
    from mose_ds.flops import CONVENTIONS, forward_flops_per_token
    from mose_ds.model import MoSEGPT, count_parameters

    engine.init_distributed(device="cpu")
    single = dataclasses.replace(cfg.moe, expert_parallel_size=1)   # counts do not depend on EP
    with torch.device("meta"):
        model = MoSEGPT(cfg.model, single)
    counts = count_parameters(model)
    moe_layers = model.moe_layers()
    expert = sum(p.numel() for m in moe_layers for p in m.local_experts.parameters())
    return {"name": cfg.model.name, **counts, "params_experts": expert,
            "num_layers": cfg.model.num_layers, "moe_layers": len(moe_layers),
            "num_experts": cfg.moe.num_experts, "top_k": cfg.moe.top_k,
            "mflops_per_token": {c: forward_flops_per_token(cfg.model, cfg.moe, 1.0, c)["total"] / 1e6
                                 for c in CONVENTIONS}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Parameter counts of a recipe (meta device).")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        # With --json, stdout carries the JSON alone: library chatter (DeepSpeed's logger binds
        # the stream when it is imported) goes to stderr.
        with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
            from mose_ds.train import quiet_libraries
            quiet_libraries()
            info = model_info(load_config(args.config, args.overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k} {v:,.2f}" for k, v in value.items())
            print(f"{key:>26}: {value:,}" if isinstance(value, int) else f"{key:>26}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
