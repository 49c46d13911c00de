"""BERT's WordPiece (``bert-base-uncased``'s ``vocab.txt``) as VLMo's text side uses it, through
the maintained ``tokenizers`` library (torch-free): ``tokenizer(text, padding="max_length",
truncation=True, max_length=T)``, i.e. ``[CLS] pieces [SEP]`` cut to T tokens (the ``[SEP]``
kept) and padded with ``[PAD]``, and the attention mask. VLMo's encoder splits its rows at T, so
the text always has exactly T positions."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import BundleError, InputError


class WordPieceTokenizer:
    def __init__(self, vocab: Path, length: int, lowercase: bool = True):
        from tokenizers import BertWordPieceTokenizer

        try:
            self.tok = BertWordPieceTokenizer(str(vocab), lowercase=lowercase)
        except Exception as e:  # tokenizers raises its own exception types
            raise BundleError(f"cannot load WordPiece vocabulary '{vocab}': {e}") from e
        if length < 2:
            raise BundleError(f"a text length of {length} holds no [CLS] and [SEP]")
        self.length = length
        self.tok.enable_truncation(max_length=length)
        pad = self.tok.token_to_id("[PAD]")
        if pad is None:
            raise BundleError(f"WordPiece vocabulary '{vocab}' has no [PAD] token")
        self.tok.enable_padding(length=length, pad_id=pad, pad_token="[PAD]")

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids [T] int64, mask [T] int64) of one text."""
        if not isinstance(text, str):
            raise InputError(f"a text is a string, not {type(text).__name__}")
        enc = self.tok.encode(text)
        return np.asarray(enc.ids, np.int64), np.asarray(enc.attention_mask, np.int64)

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids [N, T], mask [N, T])."""
        pairs = [self.encode(t) for t in texts]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
