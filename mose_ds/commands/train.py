"""mose-train: train a MoSE model with DeepSpeed on this process's ranks.

    mose-train --config ds_configs/tiny_cpu.yaml data.path=runs/quickstart/data logging.out_dir=runs/quickstart

Multi-process and multi-node runs go through `mose-launch` (or `launchers/train.sh`), which
starts `python -m mose_ds.train` on every rank with the same flags.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mose-train", description="Train a MoSE model with DeepSpeed.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", required=True, help="YAML recipe (ds_configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_iters=100")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    return p.parse_intermixed_args(argv)      # overrides may come before and after flags

def main(argv=None) -> int:
    parse_args(argv)            # --help and bad flags are answered before torch is imported
    from ..train import main as train_main
    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
