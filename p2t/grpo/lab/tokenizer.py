"""A character-level tokenizer of ours, as a real transformers tokenizer.

Every character of the lab's alphabet is one token, so token ids and characters line up one to one
(``offset_mapping`` is exact). It round-trips through ``save_pretrained`` / ``from_pretrained`` like
any HF tokenizer, which is what lets the lab run through the code paths real models use.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from transformers import PreTrainedTokenizer

DEFAULT_ALPHABET = "0123456789+-*=#\n ?"

VOCAB_FILES_NAMES = {"vocab_file": "vocab.json"}


class CharTokenizer(PreTrainedTokenizer):
    """One token per character; ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>`` as special tokens."""

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: Optional[str] = None, alphabet: str = DEFAULT_ALPHABET, pad_token="<pad>",
                 bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", add_bos_token: bool = True, **kwargs):
        if vocab_file is not None:
            with open(vocab_file, encoding="utf-8") as f:
                self._vocab = json.load(f)
        else:
            specials = [pad_token, bos_token, eos_token, unk_token]
            self._vocab = {tok: i for i, tok in enumerate(specials + list(dict.fromkeys(alphabet)))}
        self._inv = {i: t for t, i in self._vocab.items()}
        self.add_bos_token = add_bos_token
        kwargs.setdefault("padding_side", "left")
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(pad_token=pad_token, bos_token=bos_token, eos_token=eos_token, unk_token=unk_token,
                         add_bos_token=add_bos_token, **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def get_vocab(self) -> dict:
        return dict(self._vocab)

    def _tokenize(self, text: str, **kwargs) -> list:
        return list(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self._vocab.get(token, self._vocab[str(self.unk_token)])

    def _convert_id_to_token(self, index: int) -> str:
        return self._inv.get(int(index), str(self.unk_token))

    def convert_tokens_to_string(self, tokens: list) -> str:
        return "".join(tokens)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        out = bos + list(token_ids_0)
        if token_ids_1 is not None:
            out += list(token_ids_1)
        return out

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return [1 if t in self.all_special_ids else 0 for t in token_ids_0]
        n = len(token_ids_0) + (len(token_ids_1) if token_ids_1 is not None else 0)
        return ([1] if self.add_bos_token else []) + [0] * n

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> tuple:
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        path = os.path.join(save_directory, name)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self._vocab, f, ensure_ascii=False, indent=0)
        return (path,)
