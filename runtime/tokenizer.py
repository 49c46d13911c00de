"""SentencePiece tokenizer (LLaMA's ``tokenizer.model``) with incremental detokenization; the
manifest's tokenizer kind picks it or ChatGLM's (``chatglm_tokenizer``)."""
from __future__ import annotations

import codecs
from pathlib import Path

from .errors import BundleError, InputError


class SentencePieceTokenizer:
    def __init__(self, path: Path, bos_id: int, eos_id: int):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise BundleError(f"cannot load tokenizer '{path}': {e}") from e
        self.bos_id, self.eos_id = bos_id, eos_id

    @classmethod
    def from_manifest(cls, bundle):
        """The tokenizer the manifest's entry names: this class for ``sentencepiece``, ChatGLM's
        rules over SentencePiece for ``chatglm_sentencepiece``."""
        t = bundle.manifest["tokenizer"]
        if t["kind"] == "chatglm_sentencepiece":
            from .chatglm_tokenizer import ChatGLMTokenizer
            return ChatGLMTokenizer.from_entry(bundle.path(t["file"]), t)
        if t["kind"] != "sentencepiece":
            raise BundleError(f"tokenizer kind '{t['kind']}' is not supported by this runtime")
        return cls(bundle.path(t["file"]), t["bos_id"], t["eos_id"])

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    def encode(self, text: str, bos: bool) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # SentencePiece would fail on it in an unreadable cast error
            raise InputError(f"the text is not valid Unicode: it holds {text[e.start:e.end]!r} (bytes that "
                             "were not UTF-8, read with errors='surrogateescape'?)") from None
        ids = self.sp.EncodeAsIds(text)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds([i for i in ids if i < self.vocab_size])

    def stream(self) -> "Detokenizer":
        return Detokenizer(self)


class Detokenizer:
    """Turns one token at a time into text, O(1) per token. Pieces go through one incremental
    UTF-8 decoder, so byte-fallback tokens wait for a full character and invalid bytes become
    U+FFFD, as SentencePiece's own decode does."""

    def __init__(self, tok: SentencePieceTokenizer):
        self.sp = tok.sp
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.started = False

    def push(self, token: int) -> str:
        sp = self.sp
        if token >= sp.GetPieceSize() or sp.IsControl(token):
            return ""
        if sp.IsByte(token):
            raw = bytes([int(sp.IdToPiece(token)[3:5], 16)])
        elif sp.IsUnknown(token):
            raw = sp.DecodeIds([token]).encode("utf-8")
        else:
            raw = sp.IdToPiece(token).replace("\u2581", " ").encode("utf-8")
        text = self.utf8.decode(raw)
        if not self.started:  # SentencePiece drops the leading space of a decoded text
            text = text.lstrip(" ")
            self.started = bool(text)
        return text
