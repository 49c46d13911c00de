r"""InternLM2's chat format as InternLM-XComposer2's ``chat`` builds it (``interleav_wrap_chat``)::

    [UNUSED_TOKEN_146]system\n{meta}[UNUSED_TOKEN_145]\n            (left out when meta is empty)
    [UNUSED_TOKEN_146]user\n<ImageHere>{q0}[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n{a0}[UNUSED_TOKEN_145]\n
    [UNUSED_TOKEN_146]user\n{q}[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n

The manifest names the pieces (``begin``, ``end``), the roles and the system message. The prompt is
split on ``<ImageHere>`` and every non-empty text part tokenized on its own with a BOS (the
original's quirk: the part after the image gets one too); ``specials`` maps the chat pieces to
their ids, as the original's Hugging Face tokenizer splits its added tokens out before
SentencePiece encodes the text between. The answer is the decoded text before the first ``end``.
"""
from __future__ import annotations

from .fastchat import PromptKind


class InternLM2Chat(PromptKind):
    def render(self, messages: list[list]) -> str:
        s = self.spec
        begin, end = s["begin"], s["end"]
        out = f"{begin}{s['system_role']}\n{s['system']}{end}\n" if s.get("system") else ""
        for role, msg in messages:
            out += f"{begin}{s['roles'][role]}\n" + (f"{msg}{end}\n" if msg is not None else "")
        return out

    def tokenize(self, tokenizer, segments: list[str]) -> list[list[int]]:
        """Empty parts are skipped by the original (no BOS for them)."""
        return [ids if seg else [] for seg, ids in zip(segments, super().tokenize(tokenizer, segments))]

    def clean(self, text: str) -> str:
        """``response.split(end)[0]``, unstripped, as the original returns it."""
        for stop in self.spec.get("stop_strings", []):
            text = text.split(stop)[0]
        return text
