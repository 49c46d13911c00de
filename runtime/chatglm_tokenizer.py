"""ChatGLM-6B's tokenizer: its SentencePiece model (``ice_text.model``) behind the text rules of
its ``tokenization_chatglm.py``, and an incremental detokenizer that gives the same text.

Encoding turns every ``"\\n"`` into the piece ``<n>``, every tab into ``<|tab|>`` and every run of
2 to ``max_blank`` spaces into ``<|blank_k|>`` (longest runs first, so 100 spaces are
``<|blank_80|><|blank_20|>`` and 81 are ``<|blank_80|>`` plus one plain space), then encodes
with the model and adds ``id_offset`` (ChatGLM's ``num_image_tokens``: the model's ids of the
first SentencePiece ids; 0 for the 130528-row ChatGLM-6B and VisualGLM-6B, 20000 for the first
150528-row release). Decoding drops ids below the offset, decodes the rest with SentencePiece
and maps the three kinds of piece text back. Special-token text in the input (``[gMASK]``) is
encoded as plain text: only a prompt kind adds special ids.
"""
from __future__ import annotations

from pathlib import Path

from .errors import BundleError, InputError

NEWLINE, TAB = "<n>", "<|tab|>"


def blank(k: int) -> str:
    return f"<|blank_{k}|>"


class ChatGLMTokenizer:
    def __init__(self, path: Path, bos_id: int, eos_id: int, id_offset: int = 0, max_blank: int = 80):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise BundleError(f"cannot load tokenizer '{path}': {e}") from e
        if not (isinstance(id_offset, int) and id_offset >= 0 and isinstance(max_blank, int) and max_blank >= 1):
            raise BundleError(f"the tokenizer entry's id_offset ({id_offset!r}) must be an integer >= 0 and "
                              f"max_blank ({max_blank!r}) an integer >= 1")
        self.bos_id, self.eos_id, self.offset, self.max_blank = bos_id, eos_id, id_offset, max_blank
        self.markers = {NEWLINE: "\n", TAB: "\t", **{blank(k): " " * k for k in range(2, max_blank + 1)}}
        missing = [m for m in self.markers if self.sp.PieceToId(m) == self.sp.unk_id()]
        if missing:  # the rules would encode into pieces the model does not have
            raise BundleError(f"tokenizer '{path}' lacks ChatGLM's pieces {', '.join(missing[:4])}"
                              f"{' ...' if len(missing) > 4 else ''}: it is not a ChatGLM tokenizer")

    @classmethod
    def from_entry(cls, path: Path, t: dict) -> "ChatGLMTokenizer":
        if "id_offset" not in t:
            raise BundleError("the manifest's tokenizer entry (kind chatglm_sentencepiece) lacks id_offset")
        return cls(path, t["bos_id"], t["eos_id"], t["id_offset"], t.get("max_blank", 80))

    @property
    def vocab_size(self) -> int:
        """Model ids this tokenizer can produce: the offset plus the SentencePiece pieces."""
        return self.offset + self.sp.GetPieceSize()

    def piece_id(self, piece: str) -> int:
        """The model id of a piece (``"[gMASK]"``, ``"<sop>"``); a BundleError for a piece the model lacks."""
        i = self.sp.PieceToId(piece)
        if i == self.sp.unk_id() and piece != self.sp.IdToPiece(i):
            raise BundleError(f"the tokenizer has no piece '{piece}'")
        return i + self.offset

    def preprocess(self, text: str) -> str:
        text = text.replace("\n", NEWLINE).replace("\t", TAB)
        for k in range(self.max_blank, 1, -1):
            text = text.replace(" " * k, blank(k))
        return text

    def encode(self, text: str, bos: bool = False) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(f"the text is not valid Unicode: it holds {text[e.start:e.end]!r} (bytes that "
                             "were not UTF-8, read with errors='surrogateescape'?)") from None
        ids = [i + self.offset for i in self.sp.EncodeAsIds(self.preprocess(text))]
        return [self.bos_id, *ids] if bos else ids

    def postprocess(self, text: str) -> str:
        text = text.replace(NEWLINE, "\n").replace(TAB, "\t")
        for k in range(2, self.max_blank + 1):
            text = text.replace(blank(k), " " * k)
        return text

    def decode(self, ids: list[int]) -> str:
        n = self.sp.GetPieceSize()
        return self.postprocess(self.sp.DecodeIds([i - self.offset for i in ids if 0 <= i - self.offset < n]))

    def stream(self) -> "ChatGLMDetokenizer":
        return ChatGLMDetokenizer(self)


class ChatGLMDetokenizer:
    """One token at a time, O(1) per token, by SentencePiece's decoding rules: byte pieces wait for
    a full character (a byte that cannot make one, or is cut off by another piece, is U+FFFD), the
    dummy-prefix space is dropped from the first piece that is not a control piece, and the
    ``<n>``/``<|tab|>``/``<|blank_k|>`` pieces become their text. The concatenated output equals
    ``decode`` except where ordinary pieces spell a marker out letter by letter (``<`` ``n`` ``>``),
    which ``decode``'s text replacement turns into whitespace and the stream leaves as it is
    (holding ``<`` back would lose a final ``<``: the generation loop flushes no detokenizer)."""

    def __init__(self, tok: ChatGLMTokenizer):
        self.tok, self.sp = tok, tok.sp
        self.pending = b""  # bytes of byte pieces that do not make a character yet
        self.started = False  # a piece other than a control piece was seen

    def push(self, token: int) -> str:
        sp, i = self.sp, token - self.tok.offset
        if not 0 <= i < sp.GetPieceSize():  # ``decode`` drops such ids before SentencePiece sees them
            return ""
        if sp.IsByte(i):
            self.started = True
            return self._byte(int(sp.IdToPiece(i)[3:5], 16))
        text, self.pending = "\ufffd" * len(self.pending), b""  # an unfinished character: one per byte
        if sp.IsControl(i):
            return text
        if sp.IsUnknown(i):
            piece = sp.DecodeIds([i])
        else:
            piece = sp.IdToPiece(i)
            if not self.started and piece.startswith("\u2581"):
                piece = piece[1:]
        self.started = True
        return text + (self.tok.markers.get(piece) or piece.replace("\u2581", " "))

    def _byte(self, b: int) -> str:
        """SentencePiece's rule for byte pieces: valid characters as they complete, U+FFFD for
        each byte that cannot start or continue one."""
        self.pending += bytes([b])
        out = ""
        while self.pending:
            try:
                out += self.pending.decode("utf-8")
                self.pending = b""
            except UnicodeDecodeError as e:
                if e.start > 0:
                    out += self.pending[:e.start].decode("utf-8")
                    self.pending = self.pending[e.start:]
                elif e.reason == "unexpected end of data":
                    break  # a character still arriving
                else:
                    out += "\ufffd"
                    self.pending = self.pending[1:]
        return out
