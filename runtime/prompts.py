"""Conversation templates, rendered from the manifest's ``prompt`` entry.

``single`` is FastChat's SEP_STYLE.SINGLE as MiniGPT-4 uses it (Vicuna v0)::

    {system}{sep}{role0}{msg}{sep}{role1}{msg}{sep}...{role1}

Rendered text is split on the image placeholder and each segment tokenized on its own,
with BOS per the template's ``bos`` rule ("first": only the first segment).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import BundleError


@dataclass
class Conversation:
    spec: dict
    messages: list[list] = field(default_factory=list)  # [role_index, text or None]

    def add_image(self) -> None:
        self.messages.append([0, self.spec["image_message"]])

    def ask(self, text: str) -> None:
        last = self.messages[-1] if self.messages else None
        if last and last[0] == 0 and last[1].endswith(self.spec["image_message_end"]):
            last[1] = " ".join([last[1], text])  # MiniGPT-4 Chat.ask joins with a space
        else:
            self.messages.append([0, text])
        self.messages.append([1, None])

    def answer(self, text: str) -> None:
        self.messages[-1][1] = text

    def render(self) -> str:
        s = self.spec
        if s["style"] != "single":
            raise BundleError(f"prompt style '{s['style']}' is not known to this runtime")
        out = s["system"] + s["sep"]
        for role, msg in self.messages:
            out += s["roles"][role] + msg + s["sep"] if msg else s["roles"][role]
        return out

    def segments(self) -> list[str]:
        return self.render().split(self.spec["image_placeholder"])


def tokenize_segments(tokenizer, segments: list[str], bos_rule: str) -> list[list[int]]:
    """Tokenize each text segment on its own, as the reference implementations do."""
    if bos_rule not in ("first", "every", "none"):
        raise BundleError(f"unknown BOS rule '{bos_rule}' in the manifest's prompt entry")
    return [tokenizer.encode(seg, bos=(bos_rule == "every" or (bos_rule == "first" and i == 0)))
            for i, seg in enumerate(segments)]


def clean_answer(text: str, spec: dict) -> str:
    """MiniGPT-4's post-processing: cut at the separator, keep what follows the last role tag."""
    for stop in spec.get("stop_strings", []):
        text = text.split(stop)[0]
    tag = spec.get("answer_split")
    if tag:
        text = text.split(tag)[-1]
    return text.strip()
