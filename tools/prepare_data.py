#!/usr/bin/env python
"""Text -> GPT-2 BPE ids -> memory-mapped train/val shards (the `prepare` stage).

Sources: a local text file, a folder of text files (each file one document), or any
Hugging Face `datasets` name (`--hf-dataset openwebtext` for the real recipe; that one
downloads, because the user asked for it). Every document ends with <|endoftext|>. The
last `--val-fraction` of the token stream (cut at a document boundary when there are
several documents) becomes `val.bin`. Files are written under temporary names and moved
into place at the end, so an interrupted run never leaves a folder that looks complete.

    python tools/prepare_data.py --input corpus/tinyshakespeare.txt --out data/shakespeare
    python tools/prepare_data.py --hf-dataset openwebtext --out data/openwebtext --num-proc 16
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mose_ds.data import write_meta  # noqa: E402
from mose_ds.tokenizer import EOT_ID, GPT2_VOCAB_SIZE, gpt2  # noqa: E402

TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")
CHUNK_CHARS = 1 << 20


def fail(msg: str) -> None:
    print(f"prepare_data: error: {msg}", file=sys.stderr)
    sys.exit(2)


def local_documents(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path)
                       for f in names if f.endswith(TEXT_SUFFIXES))
        if not files:
            fail(f"--input {path}: no text files ({', '.join(TEXT_SUFFIXES)}) in this folder")
        return files
    fail(f"--input {path}: no such file or directory")


def tokenize_local(files: list[str]) -> list[np.ndarray]:
    """One uint16 array per document; large files are encoded in ~1 MB line-aligned chunks."""
    enc = gpt2()
    total = sum(os.path.getsize(f) for f in files)
    docs = []
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing") as bar:
        for path in files:
            pieces = []
            try:
                with open(path, encoding="utf-8") as f:
                    while chunk := f.read(CHUNK_CHARS):
                        chunk += f.readline()
                        pieces.append(np.asarray(enc.encode_ordinary(chunk), dtype=np.uint16))
                        bar.update(len(chunk.encode("utf-8")))
            except UnicodeDecodeError:
                fail(f"{path}: not UTF-8 text")
            pieces.append(np.array([EOT_ID], dtype=np.uint16))
            docs.append(np.concatenate(pieces))
    return docs


def tokenize_hf(name: str, config: str | None, split: str, field: str, num_proc: int) -> list[np.ndarray]:
    import datasets
    ds = datasets.load_dataset(name, config, split=split, num_proc=num_proc if num_proc > 1 else None)
    if field not in ds.column_names:
        fail(f"--text-field {field!r}: dataset {name} has columns {ds.column_names}")
    enc = gpt2()

    def encode(example):
        return {"ids": enc.encode_ordinary(example[field]) + [EOT_ID]}

    ds = ds.map(encode, remove_columns=ds.column_names, num_proc=num_proc, desc="tokenizing")
    return [np.asarray(ids, dtype=np.uint16) for ids in tqdm(ds["ids"], desc="collecting")]


def split_point(docs: list[np.ndarray], val_fraction: float) -> tuple[int, int]:
    """(document index, token offset inside it) where validation starts."""
    lengths = np.array([len(d) for d in docs])
    target = int(lengths.sum() * (1.0 - val_fraction))
    if len(docs) > 1:
        ends = np.cumsum(lengths)
        idx = int(np.searchsorted(ends, target, side="right"))   # docs ending by the target train
        idx = min(max(idx, 1), len(docs) - 1)
        return idx, 0
    return 0, target


def compact_ids(docs: list[np.ndarray]) -> np.ndarray:
    """Sorted GPT-2 ids used by the corpus (with <|endoftext|>); new id = index in this array."""
    used = np.unique(np.concatenate(docs + [np.array([EOT_ID], dtype=np.uint16)]))
    return used.astype(np.uint16)


def write_split(path: str, arrays: list[np.ndarray]) -> int:
    n = sum(len(a) for a in arrays)
    out = np.memmap(path, dtype=np.uint16, mode="w+", shape=(max(n, 1),))
    pos = 0
    for a in tqdm(arrays, desc=f"writing {os.path.basename(path).split('.')[0]}", leave=False):
        out[pos:pos + len(a)] = a
        pos += len(a)
    out.flush()
    del out
    return n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="a text file or a folder of text files")
    src.add_argument("--hf-dataset", help="a Hugging Face datasets name or local dataset folder")
    p.add_argument("--hf-config", default=None)
    p.add_argument("--hf-split", default="train")
    p.add_argument("--text-field", default="text")
    p.add_argument("--out", required=True, help="output folder (train.bin, val.bin, meta.json)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--num-proc", type=int, default=1)
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared folder")
    p.add_argument("--compact-vocab", action="store_true",
                   help="renumber GPT-2 ids to those the corpus uses (vocab.npy maps back); "
                        "makes tiny CPU models cheap, since the LM head dominates them")
    args = p.parse_args(argv)

    if not 0 < args.val_fraction < 1:
        fail(f"--val-fraction {args.val_fraction}: expected a value in (0, 1)")
    if os.path.exists(os.path.join(args.out, "meta.json")) and not args.overwrite:
        fail(f"--out {args.out} already holds prepared data (pass --overwrite to replace it)")
    start = time.time()
    if args.input:
        docs, source = tokenize_local(local_documents(args.input)), os.path.abspath(args.input)
    else:
        docs = tokenize_hf(args.hf_dataset, args.hf_config, args.hf_split, args.text_field, args.num_proc)
        source = f"hf:{args.hf_dataset}" + (f"/{args.hf_config}" if args.hf_config else "")
    if not docs or sum(len(d) for d in docs) < 2:
        fail("the input holds no text")
    doc, offset = split_point(docs, args.val_fraction)
    if offset:                      # a single document: cut inside it
        train, val = [docs[0][:offset]], [docs[0][offset:]]
    else:
        train, val = docs[:doc], docs[doc:]

    os.makedirs(args.out, exist_ok=True)
    vocab_size, extra = GPT2_VOCAB_SIZE, {}
    if args.compact_vocab:
        used = compact_ids(docs)
        np.save(os.path.join(args.out, "vocab.npy"), used)
        train, val = [np.searchsorted(used, a).astype(np.uint16) for a in train], \
                     [np.searchsorted(used, a).astype(np.uint16) for a in val]
        vocab_size, extra = len(used), {"compact_vocab": "vocab.npy"}
    n_train = write_split(os.path.join(args.out, "train.bin.tmp"), train)
    n_val = write_split(os.path.join(args.out, "val.bin.tmp"), val)
    for split in ("train", "val"):
        os.replace(os.path.join(args.out, f"{split}.bin.tmp"), os.path.join(args.out, f"{split}.bin"))
    eot = int(np.searchsorted(used, EOT_ID)) if args.compact_vocab else EOT_ID
    write_meta(args.out, {"tokenizer": "gpt2", "vocab_size": vocab_size, "eot_id": eot, **extra,
                          "dtype": "uint16", "train_tokens": n_train, "val_tokens": n_val,
                          "documents": len(docs), "source": source})
    print(f"prepare_data: {len(docs)} document(s), {n_train:,} train + {n_val:,} val tokens, "
          f"vocabulary {vocab_size:,}{' (compact)' if args.compact_vocab else ''} "
          f"in {time.time() - start:.1f}s -> {os.path.abspath(args.out)}/{{train.bin,val.bin,meta.json}}")


if __name__ == "__main__":
    main()
