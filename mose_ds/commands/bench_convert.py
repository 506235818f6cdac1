#!/usr/bin/env python
"""Peak resident memory of the checkpoint converters on a synthetic multi-shard checkpoint.

    mose-bench convert --out /tmp/bench_convert [--gb 1.1] [--shards 2] [--json]

Writes a random DeepSeek-V2 HF directory of about `--gb` GB (the tiny architecture widened:
hidden 1024, 16 routed experts; layers added until the size is reached), split into
`--shards` safetensors files the way `save_pretrained` splits (whole tensors, in order), then
runs `mose-convert-hf` and `mose-export-hf` on it as child processes
and reads each one's peak resident set size from the kernel (`ru_maxrss`). Also reported:
the resident size of a process that only imports the libraries the converters import, so
the part of the peak that depends on the checkpoint is visible.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository

BASE = os.path.join(ROOT, "ds_configs", "hf", "tiny_deepseek_v2", "config.json")


def synthetic_config(gb: float) -> dict:
    """The tiny config widened; MoE layers added until the fp32 weights reach `gb` GB."""
    with open(BASE) as f:
        hf = json.load(f)
    hf.update(hidden_size=1024, intermediate_size=4096, moe_intermediate_size=1024, n_routed_experts=16,
              num_experts_per_tok=2, n_shared_experts=2, num_attention_heads=8, num_key_value_heads=8,
              kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, vocab_size=40000)
    hf["num_hidden_layers"] = 2
    while parameter_bytes(hf) < gb * 1e9:
        hf["num_hidden_layers"] += 1
    return hf


def hf_shapes(hf: dict) -> dict[str, tuple]:
    """{HF tensor name: shape} of a DeepSeek-V2 model (through our model on the meta device)."""
    from mose_ds import engine
    from mose_ds.config import from_dict
    from mose_ds.hf_mapping import hf_shape, ours_to_hf
    from mose_ds.model import build_model
    engine.init_distributed(device="cpu")
    cfg = from_dict({"model": {"hf": hf, "seq_len": 128}})
    model = build_model(cfg, "meta")
    shapes = {}
    for name, p in model.named_parameters():
        for hf_name, layout in ours_to_hf(name):
            shapes[hf_name] = hf_shape(tuple(p.shape), layout)
    return shapes


def parameter_bytes(hf: dict) -> int:
    total = 0
    for shape in hf_shapes(hf).values():
        n = 4
        for d in shape:
            n *= d
        total += n
    return total


def write_checkpoint(folder: str, hf: dict, shards: int) -> dict:
    """Random fp32 tensors in `shards` files of about equal size; returns file sizes."""
    import torch
    from mose_ds.shards import write_file
    shapes = hf_shapes(hf)
    names = sorted(shapes)
    sizes = [4 * int(torch.Size(shapes[n]).numel()) for n in names]
    target, groups, acc = sum(sizes) / shards, [[]], 0
    for name, size in zip(names, sizes):
        if groups[-1] and acc + size > target * 1.02 and len(groups) < shards:
            groups.append([])
            acc = 0
        groups[-1].append(name)
        acc += size
    gen = torch.Generator().manual_seed(0)
    os.makedirs(folder, exist_ok=True)
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        write_file(os.path.join(folder, file), [(n, torch.float32, shapes[n]) for n in group],
                   lambda n: torch.randn(shapes[n], generator=gen) * 0.02, metadata={"format": "pt"})
        weight_map.update({n: file for n in group})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    return {file: os.path.getsize(os.path.join(folder, file)) for file in sorted(set(weight_map.values()))}


def peak_rss(cmd: list[str]) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of a child process run alone (the kernel's ru_maxrss of
    waited-for children is the largest any one of them reached, so children run one by one
    in fresh interpreters: `python -c` launches each so no earlier child's peak carries over)."""
    probe = ("import resource, subprocess, sys, time; t = time.time(); "
             "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.time() - t, r.returncode); "
             "sys.stderr.write(r.stderr[-2000:] if r.returncode else '')")
    from mose_ds.engine import child_env
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, env=child_env())
    rss_kb, seconds, rc = out.stdout.split()
    if int(rc) != 0:
        raise SystemExit(f"bench_convert: {' '.join(cmd[:2])} failed:\n{out.stderr}")
    return int(rss_kb) * 1024, float(seconds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mose-bench convert", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="scratch folder (the synthetic checkpoint and both conversions)")
    p.add_argument("--gb", type=float, default=1.1, help="size of the synthetic checkpoint (fp32), GB")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from mose_ds.train import quiet_libraries
    quiet_libraries()

    hf = synthetic_config(args.gb)
    shutil.rmtree(args.out, ignore_errors=True)
    src, mose, back = (os.path.join(args.out, d) for d in ("hf", "mose", "hf-back"))
    print(f"bench_convert: writing a {hf['num_hidden_layers']}-layer synthetic DeepSeek-V2 checkpoint "
          f"in {args.shards} shards to {src}", file=sys.stderr)
    start = time.time()
    files = write_checkpoint(src, hf, args.shards)
    written = time.time() - start
    imports = [sys.executable, "-c", "import mose_ds.train, mose_ds.model, mose_ds.shards, tqdm"]
    runs = {
        "imports_only": imports,
        "convert_hf_to_mose": [sys.executable, "-m", "mose_ds.commands.convert_hf", "--hf", src, "--out", mose],
        "convert_mose_to_hf": [sys.executable, "-m", "mose_ds.commands.export_hf", "--ckpt", mose,
                               "--out", back, "--max-shard-size", str(max(files.values()))],
    }
    largest = max(files.values())
    result = {"checkpoint_bytes": sum(files.values()), "shards": len(files), "largest_shard_bytes": largest,
              "layers": hf["num_hidden_layers"], "write_seconds": round(written, 1), "runs": {}}
    for name, cmd in runs.items():
        print(f"bench_convert: running {name}", file=sys.stderr)
        rss, seconds = peak_rss(cmd)
        result["runs"][name] = {"peak_rss_bytes": rss, "seconds": round(seconds, 1),
                                "peak_over_largest_shard": round(rss / largest, 3)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"\nsynthetic checkpoint: {result['checkpoint_bytes'] / 1e9:.2f} GB in {len(files)} shards, "
              f"largest {largest / 1e6:,.0f} MB ({hf['num_hidden_layers']} layers)")
        print("  run                 | peak RSS (MB) | / largest shard | seconds")
        print("  --------------------+---------------+-----------------+--------")
        for name, r in result["runs"].items():
            print(f"  {name:19s} | {r['peak_rss_bytes'] / 1e6:13,.0f} | {r['peak_over_largest_shard']:15.2f} | "
                  f"{r['seconds']:7.1f}")
    print(f"bench_convert: checkpoint and conversions under {os.path.abspath(args.out)} "
          "(delete it when done)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
