#!/usr/bin/env python
"""HF DeepSeek-V2 directory -> MoSE-DS weights folder (the `init_from` of a CPT recipe).

    mose-convert-hf --hf /models/DeepSeek-V2-Lite --out ckpt/dsv2-lite-mose

Reads `config.json` and the safetensors shards (through `model.safetensors.index.json` when
there is one), checks every tensor's name and shape against the model built from the config,
and writes our names and layouts: `weights-*.safetensors` (one per input shard, same dtype),
`weights.index.json` and `config.yaml` (the resolved model config, HF config included).
Tensors stream one at a time by byte offset, so resident memory stays near the largest
tensor, not the shard or the model. Routed experts keep their global index, so the trainer
loads the folder under any expert-parallel size. Everything is written under
`<out>.partial` and renamed at the end: an interrupted or refused conversion never leaves a
folder that looks complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time


INDEX = "model.safetensors.index.json"
WEIGHTS_INDEX = "weights.index.json"
FORMAT = "mose-ds-weights/1"


class Failure(Exception):
    pass


def hf_tensors(folder: str) -> dict:
    """{HF tensor name: TensorEntry} over the shards of an HF directory."""
    from mose_ds.shards import read_header
    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise Failure(f"{index}: not a safetensors index (no weight_map)") from None
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if absent:
            raise Failure(f"{index} names absent file(s): {', '.join(absent)}")
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        weight_map, files = None, ["model.safetensors"]
    else:
        raise Failure(f"{folder}: no {INDEX} and no model.safetensors")
    entries = {}
    for file in files:
        for name, entry in read_header(os.path.join(folder, file)).items():
            entries[name] = entry
    if weight_map is not None:
        missing = [n for n, f in weight_map.items() if n not in entries or os.path.basename(entries[n].file) != f]
        if missing:
            raise Failure(f"{index}: tensor {missing[0]} is not in {weight_map[missing[0]]}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return entries


def expected_shapes(cfg) -> dict:
    """Parameter shapes of the model (meta device, one expert-parallel rank)."""
    from mose_ds import engine
    from mose_ds.model import build_model
    engine.init_distributed(device="cpu")
    model = build_model(cfg, "meta", one_rank=True)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def convert(args, say) -> tuple[str, int, int]:
    import torch
    from tqdm import tqdm
    from mose_ds.config import ConfigError, from_dict, save_config
    from mose_ds.deepseek import HFConfigError, read_hf_config
    from mose_ds.hf_mapping import ConversionError, conversion_plan, merge_fc1, to_ours
    from mose_ds.shards import ShardError, read_tensor, staged_folder, write_file
    from mose_ds.tokenizer import model_dir_meta, write_record

    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.overwrite:
        raise Failure(f"--out {out} exists (pass --overwrite to replace it)")
    try:
        hf = read_hf_config(args.hf)
        cfg = from_dict({"model": {"name": args.name or os.path.basename(os.path.abspath(args.hf)),
                                   "hf": hf, "seq_len": args.seq_len},
                         "moe": {"expert_parallel_size": args.expert_parallel_size}}, source=args.hf)
        tensors = conversion_plan(hf_tensors(args.hf), expected_shapes(cfg))
    except (HFConfigError, ConfigError, ShardError, ConversionError) as e:
        raise Failure(str(e)) from None

    # One output file per input shard, holding the tensors whose (first) source is in it.
    by_file: dict[str, list[str]] = {}
    for name, (_, _, sources) in tensors.items():
        by_file.setdefault(sources[0][1].file, []).append(name)
    files = sorted(by_file)
    total = sum(e.end - e.start for _, _, sources in tensors.values() for _, e in sources)

    def produce(name: str) -> torch.Tensor:
        _, _, sources = tensors[name]
        parts = [read_tensor(entry) for _, entry in sources]
        bar.update(sum(e.end - e.start for _, e in sources))
        return merge_fc1(*parts) if len(parts) == 2 else to_ours(parts[0], sources[0][0])

    weight_map = {}
    try:
        with staged_folder(out, args.overwrite) as partial, \
                tqdm(total=total, unit="B", unit_scale=True, desc="converting", file=sys.stderr) as bar:
            for i, file in enumerate(files):
                target = f"weights-{i + 1:05d}-of-{len(files):05d}.safetensors"
                names = by_file[file]
                write_file(os.path.join(partial, target), [(n, tensors[n][0], tensors[n][1]) for n in names],
                           produce, metadata={"format": "pt"})
                weight_map.update({n: target for n in names})
            with open(os.path.join(partial, WEIGHTS_INDEX), "w") as f:
                json.dump({"format": FORMAT, "source": os.path.abspath(args.hf), "total_bytes": total,
                           "weight_map": dict(sorted(weight_map.items()))}, f, indent=1)
            save_config(cfg, os.path.join(partial, "config.yaml"))
            meta = model_dir_meta(args.hf)            # the model's own tokenizer travels with it
            if meta is not None:
                write_record(args.hf, partial, meta)
    except (ShardError, OSError) as e:
        raise Failure(str(e)) from None
    return out, len(weight_map), total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mose-convert-hf", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Convert an HF DeepSeek-V2 directory into a MoSE-DS weights folder.")
    p.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output folder (weights-*.safetensors, weights.index.json, config.yaml)")
    p.add_argument("--name", default=None, help="model name in the written config (default: the HF folder's name)")
    p.add_argument("--seq-len", type=int, default=4096, help="training sequence length recorded in the config")
    p.add_argument("--expert-parallel-size", type=int, default=1,
                   help="the expert-parallel size the run will use, checked against the expert count and "
                        "recorded in config.yaml (the folder itself loads under any size)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = p.parse_args(argv)
    start = time.time()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            from mose_ds.train import quiet_libraries
            quiet_libraries()
            out, count, total = convert(args, print)
    except Failure as e:
        print(f"convert_hf_to_mose: error: {e}", file=sys.stderr)
        return 2
    print(f"convert_hf_to_mose: {count} tensors, {total / 2**20:,.1f} MiB in {time.time() - start:.1f}s -> "
          f"{out}/{{weights-*.safetensors,{WEIGHTS_INDEX},config.yaml}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
