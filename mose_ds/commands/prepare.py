#!/usr/bin/env python
"""Text -> token ids -> memory-mapped train/val shards (the `prepare` stage).

Sources: a local text file or a folder of text files (`--input`, each file one document), or
with `--hf-dataset` whatever Hugging Face `datasets` (>=4) reads without a loading script: a
packaged builder over files (`--hf-dataset parquet --hf-data-files a.parquet`; json, csv and
text likewise; local paths or `hf://datasets/...` URLs), a script-free hub repo, a folder
written by `save_to_disk` (read in place with `load_from_disk`), or a name of `HF_ALIASES`:
`openwebtext`, the paper's corpus, read from parquet files (the table says which and why).
datasets>=4 no longer runs dataset loading scripts; such a source, a missing split or text
field and an unreachable hub are one-line errors naming the fix, raised before anything is
written.

Without `--streaming` the split is downloaded and converted to arrow first, then `Dataset.map`
tokenizes it on `--num-proc` processes; with it, documents are tokenized as they arrive, in
this process or on `--num-proc` worker processes a bounded number of batches ahead. Both write
the same bytes. Every document ends with <|endoftext|>. The last `--val-fraction` of the token
stream (cut at a document boundary when there are several documents) becomes `val.bin`.
Tokens stream through a temporary file, so memory stays small for OpenWebText-sized corpora;
files are written under temporary names and `meta.json` comes last, so an interrupted run
never leaves a folder that looks complete. The run ends with its rate in documents/s and
tokens/s (also in meta.json). `--tokenizer` is GPT-2 BPE (the default), raw UTF-8 bytes, or an
HF model directory (or its `tokenizer.json`), copied into the output; ids are stored as
uint16, or uint32 when the vocabulary needs it (DeepSeek-V2: 102,400).

    mose-prepare --input corpus/tinyshakespeare.txt --out data/shakespeare
    mose-prepare --hf-dataset openwebtext --out data/openwebtext --num-proc 16
    mose-prepare --hf-dataset parquet --hf-data-files 'owt/data/*.parquet' --out data/owt
    mose-prepare --input corpus/ --tokenizer /models/DeepSeek-V2-Lite --out data/cpt
"""

from __future__ import annotations

import argparse
import collections
import glob
import itertools
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from mose_ds.tokenizer import HF_TOKENIZER_FILE, HFTokenizer, base_tokenizer  # noqa: E402

TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")
CHUNK_CHARS = 1 << 20
BATCH_DOCS = 1000      # documents per tokenizing batch: amortises a hop between processes, bounds memory


class Alias(NamedTuple):
    """A dataset by a short name: a packaged builder over named files."""
    builder: str
    data_files: tuple[str, ...]
    download: str          # the command that fetches the same files, for machines without the hub


# OpenWebText (Gokaslan & Cohen, 2019), the corpus of the GPT-2 recipes, without its loading
# script. The hub repo's main branch is still `openwebtext.py` over tar archives, which
# datasets>=4 refuses ("Dataset scripts are no longer supported": nanoGPT issue 633, datasets
# issue 7693). The hub's automatic parquet conversion (revision refs/convert/parquet,
# `plain_text/partial-train`) stops after the first 5 GB, about an eighth of the corpus, and
# datasets itself declines to use a partial conversion as the dataset. The repo owner's own
# full conversion waits unmerged in pull request #18 ("convert-parquet-full": 93 shards,
# `data/train-000NN-of-00093.parquet`). The parquet builder reads those files and never looks
# at the script; naming every shard makes a missing one an error, not a smaller corpus.
HF_ALIASES = {"openwebtext": Alias(
    "parquet", tuple(f"hf://datasets/Skylion007/openwebtext@refs%2Fpr%2F18/data/train-{i:05d}-of-00093.parquet"
                     for i in range(93)),
    "hf download Skylion007/openwebtext --repo-type dataset --revision refs/pr/18 --include 'data/*' --local-dir DIR")}
SCRIPTS_REFUSED = "Dataset scripts are no longer supported"       # datasets>=4, on a loading script


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
    """One (ids, [length]) batch per document; large files are encoded in ~1 MB line-aligned chunks."""
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
            doc = np.concatenate(pieces)
            yield doc, np.array([len(doc)], dtype=np.int64)


def encode_docs(enc, texts: list[str]) -> list[list[int]]:
    return [enc.encode_ordinary(text) + [enc.eot_token] for text in texts]


def flat_batch(docs: list[list[int]], dtype) -> tuple[np.ndarray, np.ndarray]:
    """Documents as one id array plus their lengths: cheap to pickle between processes."""
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    return np.fromiter(itertools.chain.from_iterable(docs), dtype=dtype, count=int(lengths.sum())), lengths


_worker_enc = None


def _start_worker(enc) -> None:
    global _worker_enc
    _worker_enc = enc


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return flat_batch(encode_docs(_worker_enc, texts), token_dtype(_worker_enc.n_vocab))


def ordered_pool_map(fn, items, workers: int, initializer, initargs):
    """`fn` over `items` on `workers` processes, results in input order, at most 2 x `workers`
    items in flight (`Pool.imap` reads its whole input ahead: a corpus, for a stream). Workers
    are spawned, not forked, since the parent may run download threads; a worker that dies
    raises here (BrokenProcessPool) instead of leaving its batch to be waited for forever."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=initializer, initargs=initargs) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def stream_token_batches(ds, enc, field: str, num_proc: int):
    """(ids, lengths) per batch of an `IterableDataset`, tokenized here or on `num_proc` workers."""
    texts = (batch[field] for batch in ds.iter(batch_size=BATCH_DOCS))
    if num_proc == 1:
        return (flat_batch(encode_docs(enc, batch), token_dtype(enc.n_vocab)) for batch in texts)
    return ordered_pool_map(_encode_in_worker, texts, num_proc, _start_worker, (enc,))


def mapped_token_batches(ds, enc, field: str, num_proc: int, cache: str):
    """(ids, lengths) per batch of a `Dataset`, tokenized by `Dataset.map` on `num_proc`
    processes into arrow files under `cache` (ids stored at their final width), then read back
    as flat arrays without a Python object per token. The cache is this run's own and never
    reused, so it needs no fingerprint (which would hash the whole tokenizer, for seconds)."""
    import datasets
    import pyarrow.compute as pc
    dtype = token_dtype(enc.n_vocab)
    os.makedirs(cache, exist_ok=True)
    ids = ds.map(lambda batch: {"ids": encode_docs(enc, batch[field])}, batched=True, batch_size=BATCH_DOCS,
                 remove_columns=ds.column_names, num_proc=num_proc if num_proc > 1 else None,
                 features=datasets.Features({"ids": datasets.List(datasets.Value(np.dtype(dtype).name))}),
                 cache_file_name=os.path.join(cache, "ids.arrow"), load_from_cache_file=False,
                 new_fingerprint="prepare_data-ids", desc="tokenizing")
    for table in ids.with_format("arrow").iter(batch_size=BATCH_DOCS):
        column = table.column("ids").combine_chunks()
        yield column.flatten().to_numpy(), pc.list_value_length(column).to_numpy().astype(np.int64)


def is_saved_dataset(path: str) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def open_hf(name: str, config: str | None, data_files: list[str] | None, split: str, streaming: bool,
            num_proc: int):
    """The split as a `Dataset` (memory-mapped arrow) or, streaming, an `IterableDataset`."""
    import datasets
    if os.path.isdir(name) and is_saved_dataset(name):
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                fail(f"--hf-split {split}: {name} has splits {list(ds)}")
            ds = ds[split]
        return ds.to_iterable_dataset() if streaming else ds
    if name in HF_ALIASES and not data_files:
        name, data_files = HF_ALIASES[name].builder, list(HF_ALIASES[name].data_files)
    return datasets.load_dataset(name, config, data_files=data_files, split=split, streaming=streaming,
                                 num_proc=num_proc if num_proc > 1 and not streaming else None)


def load_error(name: str, split: str, e: Exception) -> str | None:
    """One line saying why `datasets` could not read `name`, naming the fix; None for an
    unexpected error, which keeps its traceback."""
    import datasets
    from huggingface_hub.utils import httpx
    first = (str(e).splitlines() or [type(e).__name__])[0]
    scripts = sorted(glob.glob(os.path.join(name, "*.py"))) if os.path.isdir(name) else []
    if SCRIPTS_REFUSED in first or (scripts and isinstance(e, (FileNotFoundError, ValueError))):
        script = first.rsplit(" ", 1)[-1] if SCRIPTS_REFUSED in first else os.path.basename(scripts[0])
        files = (f"--hf-dataset parquet (or json, csv) --hf-data-files '{name}/<data files>'" if os.path.isdir(name)
                 else f"--hf-dataset parquet --hf-data-files 'hf://datasets/{name}@refs%2Fconvert%2Fparquet/"
                      "<config>/<split>/*.parquet' (the hub's conversion; check it is not partial)")
        alias = next((a for a, v in HF_ALIASES.items() if f"datasets/{name}@" in v.data_files[0]), None)
        return (f"--hf-dataset {name}: a dataset loading script ({script}), which datasets>=4 no longer runs; "
                f"read its data files instead: {files}" + (f"; or --hf-dataset {alias}" if alias else ""))
    if isinstance(e, (ConnectionError, httpx.TransportError)):
        why = ("offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if datasets.config.HF_HUB_OFFLINE
               else f"the Hugging Face Hub is unreachable ({first})")
        download = (HF_ALIASES[name].download if name in HF_ALIASES else
                    f"hf download {name if name.count('/') == 1 else 'REPO'} --repo-type dataset --local-dir DIR")
        return (f"--hf-dataset {name}: {why}; download the data first ({download}) and give the files: "
                "--hf-dataset parquet --hf-data-files 'DIR/**/*.parquet'")
    if isinstance(e, ValueError) and "split" in first.lower():
        return f"--hf-split {split}: {first}"
    if isinstance(e, (FileNotFoundError, ValueError)):
        return f"--hf-dataset {name}: {first}"
    return None


def open_checked(args):
    """`open_hf`, with each expected failure (a loading script, no hub, a missing split or text
    field) a one-line error. A stream that does not declare its columns shows its first row."""
    try:
        ds = open_hf(args.hf_dataset, args.hf_config, args.hf_data_files, args.hf_split, args.streaming,
                     args.num_proc)
        columns = ds.column_names if ds.column_names is not None else list(next(iter(ds), {}))
    except Exception as e:
        if (msg := load_error(args.hf_dataset, args.hf_split, e)) is None:
            raise
        fail(msg)
    if args.text_field not in columns:
        fail(f"--text-field {args.text_field!r}: dataset {args.hf_dataset} has columns {columns}")
    return ds


def spool(batches, path: str, n_vocab: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Write the token batches to `path`; return document lengths and which ids occur."""
    lengths, present = [np.zeros(0, dtype=np.int64)], np.zeros(n_vocab, dtype=bool)
    with open(path, "wb") as f, tqdm(unit="doc", desc="documents", disable=not progress) as bar:
        for tokens, doc_lengths in batches:
            f.write(tokens.tobytes())
            lengths.append(doc_lengths)
            present[tokens] = True
            bar.update(len(doc_lengths))
    return np.concatenate(lengths), present


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
    p = argparse.ArgumentParser(prog="mose-prepare", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="a text file or a folder of text files")
    src.add_argument("--hf-dataset",
                     help="a datasets builder (parquet, json, csv, text: with --hf-data-files), a script-free "
                          f"hub repo, a folder written by save_to_disk, or {', '.join(HF_ALIASES)}")
    p.add_argument("--hf-config", default=None)
    p.add_argument("--hf-data-files", nargs="+", default=None,
                   help="files for a packaged builder, local or hf://datasets/..., e.g. "
                        "--hf-dataset parquet --hf-data-files 'data/*.parquet'")
    p.add_argument("--hf-split", default="train")
    p.add_argument("--text-field", default="text")
    p.add_argument("--streaming", action="store_true",
                   help="--hf-dataset: tokenize documents as they are read, without an arrow copy first")
    p.add_argument("--out", required=True, help="output folder (train.bin, val.bin, meta.json)")
    p.add_argument("--tokenizer", default="gpt2",
                   help="gpt2: GPT-2 BPE (default); bytes: UTF-8 bytes, vocabulary 257; or an HF model "
                        "directory / tokenizer.json (e.g. DeepSeek-V2's)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--num-proc", type=int, default=1, help="tokenizing processes for --hf-dataset")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared folder")
    p.add_argument("--compact-vocab", action="store_true",
                   help="renumber GPT-2 ids to those the corpus uses (vocab.npy maps back); "
                        "makes tiny CPU models cheap, since the LM head dominates them")
    args = p.parse_args(argv)

    if not 0 < args.val_fraction < 1:
        fail(f"--val-fraction {args.val_fraction}: expected a value in (0, 1)")
    if args.num_proc < 1:
        fail(f"--num-proc {args.num_proc}: expected at least 1")
    if args.streaming and not args.hf_dataset:
        fail("--streaming reads an --hf-dataset; --input is always read as a stream")
    meta_path = os.path.join(args.out, "meta.json")
    if os.path.exists(meta_path) and not args.overwrite:
        fail(f"--out {args.out} already holds prepared data (pass --overwrite to replace it)")
    hf_file = None if args.tokenizer in ("gpt2", "bytes") else hf_tokenizer_file(args.tokenizer)
    if args.input:
        files, source = local_documents(args.input), os.path.abspath(args.input)
    else:                              # before touching --out, so that its errors leave no trace
        ds, source = open_checked(args), f"hf:{args.hf_dataset}" + (f"/{args.hf_config}" if args.hf_config else "")
    enc = base_tokenizer(args.tokenizer) if hf_file is None else HFTokenizer(hf_file)
    dtype = token_dtype(enc.n_vocab)
    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    if os.path.exists(meta_path):      # --overwrite: the folder stops looking complete first
        os.remove(meta_path)
    cache = os.path.join(args.out, "tokenized.tmp")
    if args.input:
        batches = local_token_stream(files, enc)
    elif args.streaming:
        batches = stream_token_batches(ds, enc, args.text_field, args.num_proc)
    else:
        batches = mapped_token_batches(ds, enc, args.text_field, args.num_proc, cache)
    stream_path = os.path.join(args.out, "stream.bin.tmp")
    lengths, present = spool(batches, stream_path, enc.n_vocab, progress=not args.input)
    seconds = time.time() - start
    shutil.rmtree(cache, ignore_errors=True)
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
    docs_per_s, tokens_per_s = len(lengths) / max(seconds, 1e-9), int(lengths.sum()) / max(seconds, 1e-9)
    rate = {"seconds": round(seconds, 3), "documents_per_s": round(docs_per_s, 1),
            "tokens_per_s": round(tokens_per_s, 1), "num_proc": args.num_proc, "streaming": args.streaming}
    from mose_ds.prepared import write_meta
    write_meta(args.out, {"tokenizer": tokenizer, "vocab_size": vocab_size, "eot_id": eot, **extra,
                          "dtype": np.dtype(dtype).name, "train_tokens": n_train, "val_tokens": n_val,
                          "documents": len(lengths), "source": source, "tokenize_rate": rate})
    print(f"prepare_data: {len(lengths)} document(s), {n_train:,} train + {n_val:,} val tokens, "
          f"vocabulary {vocab_size:,}{' (compact)' if args.compact_vocab else ''} "
          f"in {time.time() - start:.1f}s -> {os.path.abspath(args.out)}/{{train.bin,val.bin,meta.json}}")
    print(f"prepare_data: tokenized {docs_per_s:,.0f} documents/s, {tokens_per_s:,.0f} tokens/s "
          f"({'streaming, ' if args.streaming else ''}{args.num_proc} process(es))")


if __name__ == "__main__":
    main()
