"""mose-bench: the project's benchmarks, one per subcommand.

    mose-bench moe ...          the MoE layer: time, memory, host syncs, aten ops, exchange bytes
    mose-bench generation ...   plain against self-speculative decoding; per-step decoding costs
    mose-bench convert ...      HF <-> MoSE conversion of a large synthetic checkpoint: memory, time

`mose-bench SUBCOMMAND --help` lists each one's options.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {"moe": "mose_ds.commands.bench_moe", "generation": "mose_ds.generation_bench",
               "convert": "mose_ds.commands.bench_convert"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv[0] not in SUBCOMMANDS:
        print(f"mose-bench: unknown subcommand {argv[0]!r} (expected one of {', '.join(SUBCOMMANDS)})", file=sys.stderr)
        return 2
    return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
