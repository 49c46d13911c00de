"""InternLM-XComposer2's export options (VL-7B and 4KHD-7B), its chat prompt, and the record of
what an export builds (``Ixc2Parts``), below both the recipe and the checkpoint loader."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from vlm2om.runtime.errors import InputError

from vlm2om.exporters.core.options import RecipeOptions
from vlm2om.exporters.llm.common import LlmParts

if TYPE_CHECKING:  # torch-free at run time: the CLI parses these options before importing torch
    from torch import nn

    from vlm2om.graphs.clip_vit import ClipVisionConfig
    from vlm2om.graphs.ixc2_vision import HdViewConfig
    from vlm2om.graphs.projector import MlpGeluProjectorConfig

VARIANTS = ("vl", "4khd")
HD_NUMS = (25, 55)  # encode_img's default, and what the 4KHD README chats with
# The chat's default meta instruction (modeling_internlm_xcomposer2.py, meta_instruction).
META_INSTRUCTION = (
    "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n"
    "- InternLM-XComposer (浦语·灵笔) is a multi-modality conversational language model that is developed by "
    "Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by the "
    "user such as English and 中文.\n"
    "- InternLM-XComposer (浦语·灵笔) is capable of comprehending and articulating responses effectively based "
    "on the provided image.")
# interleav_wrap_chat: "[UNUSED_TOKEN_146]{role}\n{text}[UNUSED_TOKEN_145]\n" per message, the image as
# "<ImageHere>" at the start of its question, every text part tokenized with its own BOS, the special
# pieces as their ids (``specials``: filled from the tokenizer by the recipe), stop at [UNUSED_TOKEN_145].
BEGIN, END = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"
PROMPT = {"kind": "internlm2_chat", "template": "ixc2", "system": META_INSTRUCTION, "roles": ["user", "assistant"],
          "system_role": "system", "begin": BEGIN, "end": END, "image_message": "<ImageHere>",
          "image_message_end": "<ImageHere>", "image_join": "", "image_placeholder": "<ImageHere>",
          "bos": "every", "legacy": True, "stop_strings": [END]}


@dataclass(frozen=True)
class ExportOptions(RecipeOptions):
    """InternLM-XComposer2-VL-7B's options (4KHD's add ``hd_num``)."""

    clip: str | None = field(default=None, metadata={"help": (
        "The clip-vit-large-patch14-336 folder whose config.json sizes the vision tower (default: that "
        "folder inside the checkpoint folder or beside it, else CLIP ViT-L/14-336's published config). "
        "Its weights are not read: the checkpoint holds the fine-tuned tower.")})
    meta_instruction: str | None = field(default=None, metadata={"help": (
        "The system message of every chat (default: the original's meta_instruction; '' for none).")})

    variant = "vl"

    def __post_init__(self):
        if self.clip is not None and not (Path(self.clip) / "config.json").is_file():
            raise InputError(f"--clip {self.clip}: not a folder with config.json (the clip-vit-large-patch14-336 "
                             "folder as downloaded)")

    def prompt(self, specials: dict[str, int]) -> dict:
        system = META_INSTRUCTION if self.meta_instruction is None else self.meta_instruction
        return {**PROMPT, "system": system, "specials": dict(specials)}


@dataclass(frozen=True)
class HdExportOptions(ExportOptions):
    """InternLM-XComposer2-4KHD-7B's options."""

    hd_num: int = field(default=25, metadata={"help": (
        "Most 336 px crops HD_transform makes of an image: 25 (encode_img's default) or up to 55 (the README's "
        "chats); the cache gears must hold the image tokens it implies.")})

    variant = "4khd"

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.hd_num <= max(HD_NUMS):
            raise InputError(f"--hd-num {self.hd_num}: choose 1..{max(HD_NUMS)} (the original uses 25 or 55)")


@dataclass
class Ixc2Parts:
    """What is known before any weight is read; each ``build_*`` makes one graph's module (reading
    only its weights), so an export holds one graph's weights at a time.

    VL: ``build_vision`` a ClipVisionTower at 490 px (1226 positions, all 24 layers, CLS dropped),
    ``build_projector`` an MlpGeluProjector 1024 -> 4096. 4KHD: the tower at 336 px (577 positions)
    and an HdViewProjector (2x2 merge, the separators, vision_proj 4096 -> 4096)."""

    variant: str  # "vl" or "4khd"
    vision_cfg: ClipVisionConfig
    proj_cfg: MlpGeluProjectorConfig | HdViewConfig
    llm: LlmParts  # the InternLM2 kind (exporters/llm/internlm2.py); llm.llama is the InternLM2Config
    tokenizer: bytes  # tokenizer.model (SentencePiece, with the [UNUSED_TOKEN_*] pieces)
    source: dict  # provenance: checkpoint, layout, ignored keys, where the LoRA alphas came from
    build_vision: Callable[[], nn.Module]
    build_projector: Callable[[], nn.Module]
