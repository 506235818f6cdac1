"""The tokenizer a MoSE-DS checkpoint was trained with, for `AutoTokenizer` (trust_remote_code).

`mose_tokenizer.json` names the base tokenizer: UTF-8 bytes (ids 0-255, end of text 256), or a
`tokenizer.json` beside it (an HF model's own, or GPT-2's byte-level BPE written by the
export); `vocab.npy`, when present, renumbers base ids to the model's compact vocabulary (a
base token outside it becomes the model's unknown id, the first id past the vocabulary).
Ids are what MoSE-DS's own `TextCodec` gives for the same text.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from transformers import AddedToken, PreTrainedTokenizer

EOT = "<|endoftext|>"


class MoSETokenizer(PreTrainedTokenizer):
    vocab_files_names = {"record_file": "mose_tokenizer.json"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, record_file: str, **kwargs):
        self.folder = os.path.dirname(os.path.abspath(record_file))
        with open(record_file) as f:
            self.record = json.load(f)
        kind = self.record["tokenizer"]
        if kind == "bytes":
            self.base, base_eot, base_vocab = None, 256, 257
        else:                                   # "tokenizer.json", or "gpt2" exported as one
            from tokenizers import Tokenizer
            self.base = Tokenizer.from_file(os.path.join(self.folder, "tokenizer.json"))
            base_eot = self.record.get("base_eot_id", self.record.get("eot_id"))
            base_vocab = self.base.get_vocab_size(with_added_tokens=True)
        self.base_eot = int(base_eot)
        compact = self.record.get("compact_vocab")
        self.vocab_map = np.load(os.path.join(self.folder, compact)) if compact else None
        if self.vocab_map is None:
            self.to_model, self.n_model = None, base_vocab
            self.eot_id = int(base_eot)
        else:
            self.n_model = len(self.vocab_map) + 1                  # + the unknown id
            self.to_model = np.full(max(base_vocab, int(self.vocab_map.max()) + 1), len(self.vocab_map), np.int64)
            self.to_model[self.vocab_map.astype(np.int64)] = np.arange(len(self.vocab_map))
            self.eot_id = int(self.to_model[int(base_eot)])
        kwargs["eos_token"] = AddedToken(EOT, special=True, normalized=False)
        # the end-of-text token at the model's id, whatever the base tokenizer's file says
        kwargs["added_tokens_decoder"] = {self.eot_id: kwargs["eos_token"]}
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self.n_model

    def get_vocab(self) -> dict:
        return {self._convert_id_to_token(i): i for i in range(self.n_model)}

    def _base_ids(self, text: str) -> list[int]:
        if self.base is None:
            return list(text.encode("utf-8"))
        return self.base.encode(text, add_special_tokens=False).ids

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        ids = self._base_ids(text)
        if self.to_model is not None:
            ids = [int(self.to_model[i]) if i < len(self.to_model) else len(self.vocab_map) for i in ids]
        return [self._convert_id_to_token(i) for i in ids]

    def _convert_token_to_id(self, token: str) -> int:
        if token == EOT:
            return self.eot_id
        return int(token[1:-1]) if token.startswith("<") and token.endswith(">") and token[1:-1].isdigit() else \
            self.unk_token_id if self.unk_token else self.eot_id

    def _convert_id_to_token(self, index: int) -> str:
        return EOT if index == self.eot_id else f"<{index}>"

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        ids = [self._convert_token_to_id(t) for t in tokens]
        if self.vocab_map is not None:      # the unknown id (and padding rows) read as end of text
            ids = [int(self.vocab_map[i]) if i < len(self.vocab_map) else self.base_eot for i in ids]
        if self.base is None:
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return self.base.decode(ids, skip_special_tokens=False)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        names = ["mose_tokenizer.json"] + [n for n in ("tokenizer.json", self.record.get("compact_vocab"))
                                           if n and os.path.exists(os.path.join(self.folder, n))]
        out = []
        for name in names:
            target = os.path.join(save_directory, name)
            if os.path.abspath(target) != os.path.join(self.folder, name):
                shutil.copyfile(os.path.join(self.folder, name), target)
            out.append(target)
        return tuple(out)
