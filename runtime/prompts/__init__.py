"""Prompt kinds: how a bundle's conversation becomes text and token ids.

The manifest's ``prompt`` entry names its ``kind``; each kind owns its rendering (how turns, the
image slot and the roles become text), its tokenization rule (BOS placement, special tokens) and
the clean-up of an answer. A family whose chat format is new adds one module here and one line in
``KINDS``; the pipeline, the batch path and the golden replay all go through ``Conversation``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import BundleError
from .fastchat import FastChatSingle, FastChatTwo, PromptKind
from .glm import GLMQA
from .internlm2 import InternLM2Chat

KINDS: dict[str, type] = {"fastchat_single": FastChatSingle, "fastchat_two": FastChatTwo, "glm_qa": GLMQA,
                         "internlm2_chat": InternLM2Chat}


def prompt_kind(spec: dict):
    """The kind the manifest's prompt entry names (a schema 1 entry is upgraded when the bundle opens)."""
    name = spec.get("kind")
    if name not in KINDS:
        raise BundleError(f"prompt kind '{name}' is not known to this runtime (it knows {', '.join(KINDS)}); "
                          "upgrade vlm2om or re-export the bundle with this one")
    return KINDS[name](spec)


@dataclass
class Conversation:
    """The turns of one chat, rendered by the bundle's prompt kind."""

    spec: dict
    messages: list[list] = field(default_factory=list)  # [role index, text or None]

    def __post_init__(self):
        self.kind = prompt_kind(self.spec)

    def add_image(self) -> None:
        self.kind.add_image(self.messages)

    def ask(self, text: str) -> None:
        self.kind.ask(self.messages, text)

    def answer(self, text: str) -> None:
        self.messages[-1][1] = text

    def render(self) -> str:
        return self.kind.render(self.messages)

    def segments(self) -> list[str]:
        """The rendered text split at each image slot."""
        return self.kind.split(self.render())

    def tokenize(self, tokenizer) -> list[list[int]]:
        """Token ids of every text segment, by the kind's rule."""
        return self.kind.tokenize(tokenizer, self.segments())

    def clean(self, text: str) -> str:
        return self.kind.clean(text)


def tokenize_prompt(tokenizer, segments: list[str], spec: dict) -> list[list[int]]:
    return prompt_kind(spec).tokenize(tokenizer, segments)


def clean_answer(text: str, spec: dict) -> str:
    return prompt_kind(spec).clean(text)


__all__ = ["KINDS", "Conversation", "PromptKind", "clean_answer", "prompt_kind", "tokenize_prompt"]
