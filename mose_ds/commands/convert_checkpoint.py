"""Make a training checkpoint resumable on another cluster shape (MoE-aware universal form).

    mose-convert-checkpoint --ckpt runs/x [--out runs/x/universal_iter_N]
    python -m mose_ds.train --config R checkpoint.resume=<out> logging.out_dir=<new run> [new layout]

Reads a DeepSpeed ZeRO-1/2 checkpoint of any world size and expert-parallel size (a tag folder,
or a run folder: its newest complete checkpoint) and writes fp32 master weights, both Adam
moments and the step per parameter, experts under their global index, plus the schedule and
data position. A job of any layout resumes from it and re-saves it in its own layout.
"""

import argparse
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mose-convert-checkpoint", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a checkpoint tag folder or a run folder")
    p.add_argument("--out", help="output folder (default: <ckpt tag>.universal beside the tag folder)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    from mose_ds.checkpoint import CheckpointError
    from mose_ds.inference import resolve_checkpoint
    from mose_ds.universal import convert
    start = time.time()
    try:
        folder = resolve_checkpoint(args.ckpt)
        out = args.out or folder.rstrip("/") + ".universal"
        print(f"converting {folder} -> {out}", flush=True)
        info = convert(folder, out, args.overwrite)
    except (CheckpointError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    moments = "fp32 masters + Adam moments" if info["optimizer_state"] else \
        "weights only (no ZeRO optimizer shards: the resumed run restarts Adam moments)"
    print(f"wrote {out}: {info['tensors']} tensors ({moments}), iteration {info['iteration']}, "
          f"from {info['world_size']} rank(s) with EP={info['expert_parallel_size']}, in {time.time() - start:.1f} s\n"
          f"resume on any layout: checkpoint.resume={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
