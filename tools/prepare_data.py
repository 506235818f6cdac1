#!/usr/bin/env python
"""Text -> token ids -> memory-mapped train/val shards (the `prepare` stage).

Sources: a local text file, a folder of text files (each file one document), or any
Hugging Face `datasets` name (`--hf-dataset openwebtext` for the real recipe; that one
downloads, because the user asked for it; `--hf-dataset json --hf-data-files a.jsonl` reads
local files). Every document ends with <|endoftext|>. The last `--val-fraction` of the token
stream (cut at a document boundary when there are several documents) becomes `val.bin`.
Tokens stream through a temporary file, so memory stays small for OpenWebText-sized
corpora; files are written under temporary names and `meta.json` comes last, so an
interrupted run never leaves a folder that looks complete. `--tokenizer` is GPT-2 BPE (the
default), raw UTF-8 bytes, or an HF model directory (or its `tokenizer.json`), copied into
the output; ids are stored as uint16, or uint32 when the vocabulary needs it (DeepSeek-V2:
102,400).

    python tools/prepare_data.py --input corpus/tinyshakespeare.txt --out data/shakespeare
    python tools/prepare_data.py --hf-dataset openwebtext --out data/openwebtext --num-proc 16
    python tools/prepare_data.py --input corpus/ --tokenizer /models/DeepSeek-V2-Lite --out data/cpt
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mose_ds.data import write_meta  # noqa: E402
from mose_ds.tokenizer import HF_TOKENIZER_FILE, HFTokenizer, base_tokenizer  # noqa: E402

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


def token_dtype(n_vocab: int):
    return np.uint16 if n_vocab <= 1 << 16 else np.uint32


def local_token_stream(files: list[str], enc):
    """One id array per document; large files are encoded in ~1 MB line-aligned chunks."""
    dtype = token_dtype(enc.n_vocab)
    total = sum(os.path.getsize(f) for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing") as bar:
        for path in files:
            pieces = []
            try:
                with open(path, encoding="utf-8") as f:
                    while chunk := f.read(CHUNK_CHARS):
                        chunk += f.readline()
                        pieces.append(np.asarray(enc.encode_ordinary(chunk), dtype=dtype))
                        bar.update(len(chunk.encode("utf-8")))
            except UnicodeDecodeError:
                fail(f"{path}: not UTF-8 text")
            pieces.append(np.array([enc.eot_token], dtype=dtype))
            yield np.concatenate(pieces)


def hf_token_stream(enc, name: str, config: str | None, data_files: list[str] | None, split: str,
                    field: str, num_proc: int):
    """Tokenize with `datasets.map` (parallel), then yield the documents in order."""
    import datasets
    try:
        ds = datasets.load_dataset(name, config, data_files=data_files, split=split,
                                   num_proc=num_proc if num_proc > 1 else None)
    except (FileNotFoundError, ValueError) as e:
        fail(f"--hf-dataset {name}: {str(e).splitlines()[0]}")
    if field not in ds.column_names:
        fail(f"--text-field {field!r}: dataset {name} has columns {ds.column_names}")

    def encode(example):
        return {"ids": enc.encode_ordinary(example[field]) + [enc.eot_token]}

    ds = ds.map(encode, remove_columns=ds.column_names, num_proc=num_proc, desc="tokenizing")
    for batch in tqdm(ds.iter(batch_size=1024), total=-(-len(ds) // 1024), desc="collecting"):
        for ids in batch["ids"]:
            yield np.asarray(ids, dtype=token_dtype(enc.n_vocab))


def spool(docs, path: str, n_vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Write the token stream to `path`; return document lengths and which ids occur."""
    lengths, present = [], np.zeros(n_vocab, dtype=bool)
    with open(path, "wb") as f:
        for doc in docs:
            f.write(doc.tobytes())
            lengths.append(len(doc))
            present[doc] = True
    return np.asarray(lengths, dtype=np.int64), present


def split_point(lengths: np.ndarray, val_fraction: float) -> int:
    """Token index where validation starts: at a document boundary when there are several."""
    target = int(int(lengths.sum()) * (1.0 - val_fraction))
    if len(lengths) == 1:
        return target
    ends = np.cumsum(lengths)
    train_docs = int(np.searchsorted(ends, target, side="right"))   # documents ending by the target
    return int(ends[min(max(train_docs, 1), len(lengths) - 1) - 1])


def write_split(tokens: np.ndarray, path: str, remap: np.ndarray | None) -> int:
    """Copy `tokens` into a memory map at `path` in chunks, renumbered through `remap`."""
    out = np.memmap(path, dtype=tokens.dtype, mode="w+", shape=(max(len(tokens), 1),))
    step = 1 << 24
    name = os.path.basename(path).split(".")[0]
    for start in tqdm(range(0, len(tokens), step), desc=f"writing {name}", leave=False):
        chunk = tokens[start:start + step]
        out[start:start + len(chunk)] = chunk if remap is None else remap[chunk]
    out.flush()
    del out
    return len(tokens)


def hf_tokenizer_file(path: str) -> str:
    """`tokenizer.json` of an HF model directory (or the file itself), loadable."""
    file = os.path.join(path, HF_TOKENIZER_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        fail(f"--tokenizer {path}: not gpt2, bytes, an HF model directory with {HF_TOKENIZER_FILE}, "
             "or a tokenizer.json file")
    try:
        HFTokenizer(file)
    except ValueError as e:
        fail(f"--tokenizer {path}: {e}")
    return file


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="a text file or a folder of text files")
    src.add_argument("--hf-dataset", help="a Hugging Face datasets name or local dataset folder")
    p.add_argument("--hf-config", default=None)
    p.add_argument("--hf-data-files", nargs="+", default=None,
                   help="local files for a generic builder, e.g. --hf-dataset json --hf-data-files a.jsonl")
    p.add_argument("--hf-split", default="train")
    p.add_argument("--text-field", default="text")
    p.add_argument("--out", required=True, help="output folder (train.bin, val.bin, meta.json)")
    p.add_argument("--tokenizer", default="gpt2",
                   help="gpt2: GPT-2 BPE (default); bytes: UTF-8 bytes, vocabulary 257; or an HF model "
                        "directory / tokenizer.json (e.g. DeepSeek-V2's)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--num-proc", type=int, default=1)
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared folder")
    p.add_argument("--compact-vocab", action="store_true",
                   help="renumber GPT-2 ids to those the corpus uses (vocab.npy maps back); "
                        "makes tiny CPU models cheap, since the LM head dominates them")
    args = p.parse_args(argv)

    if not 0 < args.val_fraction < 1:
        fail(f"--val-fraction {args.val_fraction}: expected a value in (0, 1)")
    meta_path = os.path.join(args.out, "meta.json")
    if os.path.exists(meta_path) and not args.overwrite:
        fail(f"--out {args.out} already holds prepared data (pass --overwrite to replace it)")
    if args.input:
        files, source = local_documents(args.input), os.path.abspath(args.input)
    hf_file = None if args.tokenizer in ("gpt2", "bytes") else hf_tokenizer_file(args.tokenizer)
    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    if os.path.exists(meta_path):      # --overwrite: the folder stops looking complete first
        os.remove(meta_path)
    enc = base_tokenizer(args.tokenizer) if hf_file is None else HFTokenizer(hf_file)
    dtype = token_dtype(enc.n_vocab)
    if args.input:
        docs = local_token_stream(files, enc)
    else:
        docs = hf_token_stream(enc, args.hf_dataset, args.hf_config, args.hf_data_files, args.hf_split,
                               args.text_field, args.num_proc)
        source = f"hf:{args.hf_dataset}" + (f"/{args.hf_config}" if args.hf_config else "")
    stream_path = os.path.join(args.out, "stream.bin.tmp")
    lengths, present = spool(docs, stream_path, enc.n_vocab)
    if lengths.sum() < 2:
        os.remove(stream_path)
        fail("the input holds no text")
    tokens = np.memmap(stream_path, dtype=dtype, mode="r")
    cut = split_point(lengths, args.val_fraction)

    vocab_size, eot, remap, extra = enc.n_vocab, enc.eot_token, None, {}
    if args.compact_vocab:
        present[enc.eot_token] = True
        used = np.nonzero(present)[0].astype(dtype)              # new id = index in this array
        remap = np.zeros(enc.n_vocab, dtype=dtype)
        remap[used] = np.arange(len(used), dtype=dtype)
        np.save(os.path.join(args.out, "vocab.npy"), used)
        vocab_size, eot, extra = len(used), int(remap[enc.eot_token]), {"compact_vocab": "vocab.npy"}
    n_train = write_split(tokens[:cut], os.path.join(args.out, "train.bin.tmp"), remap)
    n_val = write_split(tokens[cut:], os.path.join(args.out, "val.bin.tmp"), remap)
    del tokens
    os.remove(stream_path)
    for split in ("train", "val"):
        os.replace(os.path.join(args.out, f"{split}.bin.tmp"), os.path.join(args.out, f"{split}.bin"))
    tokenizer = args.tokenizer
    if hf_file is not None:
        shutil.copy(hf_file, os.path.join(args.out, HF_TOKENIZER_FILE))
        tokenizer, extra = HF_TOKENIZER_FILE, {**extra, "base_eot_id": enc.eot_token,
                                               "tokenizer_source": os.path.abspath(hf_file)}
    write_meta(args.out, {"tokenizer": tokenizer, "vocab_size": vocab_size, "eot_id": eot, **extra,
                          "dtype": np.dtype(dtype).name, "train_tokens": n_train, "val_tokens": n_val,
                          "documents": len(lengths), "source": source})
    print(f"prepare_data: {len(lengths)} document(s), {n_train:,} train + {n_val:,} val tokens, "
          f"vocabulary {vocab_size:,}{' (compact)' if args.compact_vocab else ''} "
          f"in {time.time() - start:.1f}s -> {os.path.abspath(args.out)}/{{train.bin,val.bin,meta.json}}")


if __name__ == "__main__":
    main()
