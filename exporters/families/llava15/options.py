"""LLaVA-1.5's export options, the prompt templates ``--template`` picks from, and the record
of what an export builds (``LlavaParts``), below both the recipe and the checkpoint loader."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from vlm2om.runtime.errors import InputError

from vlm2om.exporters.llm.common import LlmParts

from vlm2om.exporters.core.options import RecipeOptions

if TYPE_CHECKING:  # torch-free at run time: the CLI parses these options before importing torch
    from torch import nn

    from vlm2om.graphs.clip_vit import ClipVisionConfig
    from vlm2om.graphs.projector import MlpGeluProjectorConfig

_SYSTEM = ("A chat between a curious {who} and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the {who}'s questions.")
# FastChat SEP_STYLE.TWO as LLaVA's conv_templates define them; the first image turn is
# "<image>\n" + question; "</s>" inside a multi-turn prompt is the EOS token, as LLaVA's Hugging
# Face tokenizer reads it; "legacy" is replaced by the checkpoint's tokenizer_config flag.
_TWO = {"kind": "fastchat_two", "roles": ["USER", "ASSISTANT"], "sep": " ", "sep2": "</s>",
        "image_message": "<image>", "image_message_end": "<image>", "image_join": "\n",
        "image_placeholder": "<image>", "bos": "first", "specials": {"</s>": 2}, "legacy": False,
        "stop_strings": ["</s>"]}
PROMPTS = {"vicuna_v1": {"template": "vicuna_v1", "system": _SYSTEM.format(who="user"), **_TWO},  # v1.5 evals
           "llava_v1": {"template": "llava_v1", "system": _SYSTEM.format(who="human"), **_TWO}}  # run_llava


@dataclass(frozen=True)
class ExportOptions(RecipeOptions):
    template: str = field(default="vicuna_v1", metadata={"help": f"Prompt template: {' or '.join(PROMPTS)}."})

    def __post_init__(self):
        if self.template not in PROMPTS:
            raise InputError(f"unknown LLaVA prompt template '{self.template}' (available: {', '.join(PROMPTS)})")


@dataclass
class LlavaParts:
    """What is known before any weight is read; each ``build_*`` makes one graph's module."""

    vision_cfg: ClipVisionConfig
    proj_cfg: MlpGeluProjectorConfig
    llm: LlmParts
    tokenizer: bytes
    source: dict
    build_vision: Callable[[], nn.Module]
    build_projector: Callable[[], nn.Module]
    pad_to_square: bool = True  # image_aspect_ratio 'pad'
    legacy: bool = False  # the tokenizer's legacy flag (text after a special token)
    image_token_index: int | None = None
    layout: str = "preset"
