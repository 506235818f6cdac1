#!/usr/bin/env python
"""Parameter counts of a recipe's model, built on the meta device (no memory, no weights).

    mose-info ds_configs/gpt2_small_e8a2.yaml [--json] [key=value ...]

`params_total` counts tied embeddings once; `params_active_per_token` keeps k of the E
experts of every MoE layer (what one token runs through at full width). `mflops_per_token` is
the forward compute of one token at full width over a full `seq_len` context, in the paper's
and the standard convention (mose_ds/flops.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mose-info", description="Parameter counts of a recipe (meta device).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("config", help="YAML recipe (ds_configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_layers=12")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = p.parse_args(argv)
    # With --json, stdout carries the JSON alone: library chatter (DeepSpeed's logger binds
    # the stream when it is imported) goes to stderr.
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        from mose_ds.config import ConfigError, load_config
        from mose_ds.model import model_info
    try:
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
