#!/usr/bin/env python
"""MoSE-DS model -> HF directory that `transformers` loads.

    mose-export-hf --ckpt RUN --out DIR --slimmable [--gamma-table RUN/gamma_table.yaml] [--policy ...]
    mose-export-hf --ckpt runs/dsv2-lite-cpt --out export/dsv2-lite-cpt \\
        --tokenizer-from /models/DeepSeek-V2-Lite

`--slimmable` (either family): our model code travels with the weights (`mose_ds/hf_export.py`);
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads it, with the width
policy of the `--policy` flags as its default, any other per call
(`model(ids, width_policy={"kind": "uniform", "width": 0.5})`), the gamma table embedded, and
the checkpoint's tokenizer behind `AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)`.

Without it (DeepSeek-V2 only), the plain export below, at full width:

`--ckpt` is either a weights folder written by `mose-convert-hf` (streamed tensor
by tensor, so an HF -> MoSE -> HF round trip is bit-identical and memory stays near one
tensor) or a training checkpoint (a tag folder, a checkpoint root with `latest`, or a run
folder; written under any ZeRO stage and expert-parallel layout), whose weights are loaded on
one process. The model is exported at full width: routed experts, shared experts and all
other weights as trained; width policies and gamma tables have no HF counterpart.

Writes `config.json` (the HF config the model was built from, `torch_dtype` set to the
exported dtype), `model.safetensors` or `model-XXXXX-of-YYYYY.safetensors` shards with
`model.safetensors.index.json`, the tokenizer the checkpoint records (`mose_tokenizer.json`
and its files; for an HF tokenizer also a `tokenizer_config.json` naming its end-of-text
token, so `AutoTokenizer` loads the folder), and the tokenizer files of `--tokenizer-from`
when given, which must hold the tokenizer the checkpoint records. Everything is written
under `<out>.partial` and renamed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time


from mose_ds.policies import add_policy_arguments

HF_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


class Failure(Exception):
    pass


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    upper = text.strip().upper()
    for unit, scale in units.items():
        if upper.endswith(unit) and upper[:-len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[:-len(unit)]) * scale)
    if upper.isdigit():
        return int(upper)
    raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 5GB, 500MB)")


def weights_source(folder: str, dtype):
    """(config, [(HF name, dtype, shape, produce)]) of a weights folder, streamed by offset."""
    from mose_ds.checkpoint import CheckpointError, checkpoint_config, read_weights_index
    from mose_ds.hf_mapping import hf_shape, ours_to_hf, to_hf
    from mose_ds.shards import DTYPES as SAFE_DTYPES, read_header, read_tensor
    try:
        weight_map, cfg = read_weights_index(folder), checkpoint_config(folder)
    except CheckpointError as e:
        raise Failure(str(e)) from None
    headers = {}
    for file in sorted(set(weight_map.values())):
        headers[file] = read_header(os.path.join(folder, file))
    tensors = []
    for name, file in weight_map.items():
        entry = headers[file].get(name)
        if entry is None:
            raise Failure(f"{folder}/weights.index.json: tensor {name} is not in {file}")
        for hf_name, layout in _hf_names(name, ours_to_hf):
            out_dtype = dtype or SAFE_DTYPES[entry.dtype]
            shape = hf_shape(entry.shape, layout)
            tensors.append((hf_name, out_dtype, shape,
                            lambda e=entry, l=layout, d=out_dtype: to_hf(read_tensor(e), l).to(d)))
    return cfg, tensors


def checkpoint_source(path: str, dtype):
    """(config, [(HF name, dtype, shape, produce)]) of a training checkpoint, loaded on one rank."""
    import torch
    from mose_ds.checkpoint import CheckpointError
    from mose_ds.hf_mapping import hf_shape, ours_to_hf, to_hf
    from mose_ds.inference import load_model
    try:
        loaded = load_model(path)
    except CheckpointError as e:
        raise Failure(str(e)) from None
    cfg = loaded.cfg
    path = loaded.folder             # the tag folder, whose tokenizer record is exported
    if cfg.model.family != "deepseek_v2":
        raise Failure(f"{loaded.folder}: a {cfg.model.family} model; only the DeepSeek-V2 family has an HF export")
    if dtype is None:
        dtype = torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32
    tensors = []
    for name, param in loaded.model.named_parameters():
        for hf_name, layout in _hf_names(name, ours_to_hf):
            tensors.append((hf_name, dtype, hf_shape(tuple(param.shape), layout),
                            lambda p=param, l=layout: to_hf(p.detach(), l).to(dtype).contiguous()))
    return cfg, tensors, path


def tokenizer_files(folder: str, tokenizer_from: str | None) -> list[str]:
    """The files of the tokenizer `folder` records, to be copied into the export ([] without
    a record). `tokenizer_from` must hold that same tokenizer.json."""
    from mose_ds.tokenizer import (HF_TOKENIZER_FILE, RECORD_FILE, VOCAB_FILE, TokenizerError, file_sha256,
                                   describe, read_record)
    try:
        record = read_record(folder)
    except TokenizerError as e:
        raise Failure(str(e)) from None
    if record is None:
        return []
    hf = record["tokenizer"] == HF_TOKENIZER_FILE and not record.get("compact_vocab")
    if tokenizer_from and not (hf and file_sha256(os.path.join(tokenizer_from, HF_TOKENIZER_FILE))
                               == record["files_sha256"][HF_TOKENIZER_FILE]):
        raise Failure(f"--tokenizer-from {tokenizer_from}: its {HF_TOKENIZER_FILE} is not the tokenizer "
                      f"{folder} records ({describe(record)})")
    return [RECORD_FILE] + ([HF_TOKENIZER_FILE] if record["tokenizer"] == HF_TOKENIZER_FILE else []) + \
        ([VOCAB_FILE] if record.get("compact_vocab") else [])


def write_tokenizer(folder: str, names: list[str], out: str) -> list[str]:
    """Copy `names` (from `tokenizer_files`) from `folder` into `out`; for an HF tokenizer
    whose ids are the model's (no compact vocabulary), add a `tokenizer_config.json` naming
    the end-of-text token of the record. Returns the names written."""
    from mose_ds.tokenizer import HF_TOKENIZER_FILE, RECORD_FILE, VOCAB_FILE
    for name in names:
        shutil.copyfile(os.path.join(folder, name), os.path.join(out, name))
    if HF_TOKENIZER_FILE not in names or VOCAB_FILE in names:
        return names
    from tokenizers import Tokenizer
    with open(os.path.join(folder, RECORD_FILE)) as f:
        eot = json.load(f)["base_eot_id"]
    eos = Tokenizer.from_file(os.path.join(folder, HF_TOKENIZER_FILE)).id_to_token(eot)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos}, f, indent=2)
    return names + ["tokenizer_config.json"]


def _hf_names(name: str, ours_to_hf) -> list[tuple[str, str]]:
    try:
        return ours_to_hf(name)
    except KeyError:
        raise Failure(f"tensor {name} has no DeepSeek-V2 counterpart") from None


def shard_plan(tensors: list, max_bytes: int) -> list[list]:
    """Consecutive tensors grouped into shards of at most `max_bytes` (a larger tensor alone)."""
    shards, size = [[]], 0
    for t in tensors:
        nbytes = _nbytes(t)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def _nbytes(t) -> int:
    _, dtype, shape, _ = t
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def hf_config(cfg, dtype_name: str) -> dict:
    """The HF config the model was built from, for the native `DeepseekV2ForCausalLM`."""
    hf = {k: v for k, v in cfg.model.hf.items() if k not in ("auto_map", "dtype", "torch_dtype")}
    return {**hf, "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
            "torch_dtype": dtype_name}


def convert(args) -> tuple[str, int, int, int]:
    import torch
    from tqdm import tqdm
    from mose_ds.shards import NAMES, ShardError, staged_folder, write_file

    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.overwrite:
        raise Failure(f"--out {out} exists (pass --overwrite to replace it)")
    if not os.path.exists(args.ckpt):
        raise Failure(f"--ckpt {args.ckpt}: no such file or directory")
    if args.tokenizer_from and not os.path.isfile(os.path.join(args.tokenizer_from, "tokenizer.json")):
        raise Failure(f"--tokenizer-from {args.tokenizer_from}: no tokenizer.json there")
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else None
    try:
        if os.path.isfile(os.path.join(args.ckpt, "weights.index.json")):
            (cfg, tensors), folder = weights_source(args.ckpt, dtype), args.ckpt
        else:
            cfg, tensors, folder = checkpoint_source(args.ckpt, dtype)
    except ShardError as e:
        raise Failure(str(e)) from None
    tokenizer = tokenizer_files(folder, args.tokenizer_from)
    tensors.sort(key=lambda t: _hf_order(t[0]))
    dtypes = {t[1] for t in tensors}
    dtype_name = str(max(dtypes, key=lambda d: d.itemsize)).removeprefix("torch.")
    shards = shard_plan(tensors, args.max_shard_size)
    total = sum(_nbytes(t) for t in tensors)
    copied = []
    try:
        with staged_folder(out, args.overwrite) as partial, \
                tqdm(total=total, unit="B", unit_scale=True, desc="exporting", file=sys.stderr) as bar:
            weight_map = {}
            for i, shard in enumerate(shards):
                file = "model.safetensors" if len(shards) == 1 else \
                    f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                produce = {name: fn for name, _, _, fn in shard}

                def make(name, produce=produce):
                    tensor = produce[name]()
                    bar.update(tensor.numel() * tensor.element_size())
                    return tensor
                write_file(os.path.join(partial, file), [(n, d, s) for n, d, s, _ in shard], make,
                           metadata={"format": "pt"})
                weight_map.update({name: file for name, *_ in shard})
            if len(shards) > 1:
                with open(os.path.join(partial, HF_INDEX), "w") as f:
                    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
            with open(os.path.join(partial, "config.json"), "w") as f:
                json.dump(hf_config(cfg, dtype_name), f, indent=2)
            copied += write_tokenizer(folder, tokenizer, partial)
            for name in TOKENIZER_FILES if args.tokenizer_from else ():
                if os.path.isfile(os.path.join(args.tokenizer_from, name)):
                    shutil.copy(os.path.join(args.tokenizer_from, name), os.path.join(partial, name))
                    copied += [] if name in copied else [name]
    except (ShardError, OSError) as e:
        raise Failure(str(e)) from None
    print(f"dtypes: {', '.join(sorted(NAMES[d] for d in dtypes))}; tokenizer files: "
          f"{', '.join(copied) or 'none (pass --tokenizer-from HF_DIR)'}")
    return out, len(tensors), len(shards), total


def _hf_order(name: str):
    """Layers in numeric order (as HF writes them), then the rest."""
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers":
        return (1, int(parts[2]), name)
    return (0 if "embed" in name else 2, 0, name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mose-export-hf", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Export a MoSE-DS DeepSeek-V2 model (full width) to an HF directory.")
    p.add_argument("--ckpt", required=True,
                   help="weights folder (convert_hf_to_mose.py) or training checkpoint / run folder")
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument("--dtype", default="auto", choices=["auto", *EXPORT_DTYPES],
                   help="auto: the weights folder's dtypes, or the run's precision for a checkpoint")
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"),
                   help="largest safetensors shard (default 5GB, as save_pretrained)")
    p.add_argument("--tokenizer-from", default=None,
                   help="HF directory whose tokenizer files are copied into --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    s = p.add_argument_group("slimmable export (both families)")
    s.add_argument("--slimmable", action="store_true", help="our model code with width control (trust_remote_code)")
    s.add_argument("--gamma-table", help="gamma table to embed (from mose-calibrate for this checkpoint)")
    s.add_argument("--data", help="prepared data folder (only for a checkpoint that records no tokenizer)")
    add_policy_arguments(s)
    args = p.parse_args(argv)
    if args.slimmable:
        return slimmable(args)
    start = time.time()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            from mose_ds.train import quiet_libraries
            quiet_libraries()
            out, count, shards, total = convert(args)
    except Failure as e:
        print(f"convert_mose_to_hf: error: {e}", file=sys.stderr)
        return 2
    print(f"convert_mose_to_hf: {count} tensors, {total / 2**20:,.1f} MiB in {shards} shard(s), "
          f"{time.time() - start:.1f}s -> {out} (AutoModelForCausalLM.from_pretrained({out!r}))")
    return 0


def slimmable(args) -> int:
    """The slimmable export (mose_ds/hf_export.py)."""
    with contextlib.redirect_stdout(sys.stderr):
        from mose_ds.train import quiet_libraries
        quiet_libraries()
        from mose_ds.checkpoint import CheckpointError
        from mose_ds.hf_export import ExportError, export_slimmable
        from mose_ds.policies import PolicyError, spec_from_arguments
        from mose_ds.tokenizer import TokenizerError
        try:
            done = export_slimmable(args.ckpt, args.out, args.overwrite, "float32" if args.dtype == "auto" else args.dtype,
                                    spec_from_arguments(args), args.gamma_table, args.data)
        except (CheckpointError, ExportError, PolicyError, TokenizerError, FileExistsError) as e:
            print(f"mose-export-hf: error: {e}", file=sys.stderr)
            return 2
    print(f"mose-export-hf: {done['family']} model, {done['tensors']} tensors ({done['bytes'] / 2**20:,.1f} MiB), "
          f"gamma table {'embedded' if done['gamma_table'] else 'none'} -> {done['out']}\n"
          f"  AutoModelForCausalLM.from_pretrained({done['out']!r}, trust_remote_code=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
