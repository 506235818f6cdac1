"""A prepared data folder's `meta.json` (what `mose-prepare` writes beside the token shards):
the shards' dtype and vocabulary size, and which tokenizer made the ids. Read by the data
loader (`data.py`) and by the tokenizer code (`tokenizer.py`), which need nothing else of
each other.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .config import ConfigError

HF_TOKENIZER_FILE = "tokenizer.json"
TOKENIZERS = ("gpt2", "bytes", HF_TOKENIZER_FILE)

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def write_meta(folder: str, meta: dict) -> None:
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)


def read_meta(folder: str) -> dict:
    path = os.path.join(folder, "meta.json")
    if not os.path.isdir(folder):
        raise ConfigError(f"data.path: no such directory: {folder} (run mose-prepare first)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"data.path: {path} is missing (not a folder written by mose-prepare)") from None
    except json.JSONDecodeError:
        raise ConfigError(f"data.path: {path} is not valid JSON") from None
    if meta.get("dtype") not in DTYPES:
        raise ConfigError(f"{path}: unknown dtype {meta.get('dtype')!r}")
    if meta.setdefault("tokenizer", "gpt2") not in TOKENIZERS:
        raise ConfigError(f"{path}: unknown tokenizer {meta['tokenizer']!r} (expected one of {', '.join(TOKENIZERS)})")
    if meta["tokenizer"] == HF_TOKENIZER_FILE and not os.path.isfile(os.path.join(folder, HF_TOKENIZER_FILE)):
        raise ConfigError(f"{path}: names tokenizer {HF_TOKENIZER_FILE}, which is missing from {folder}")
    return meta
