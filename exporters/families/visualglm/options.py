"""VisualGLM-6B's export options, its two prompt languages, and the record of what an export
builds (``VisualGLMParts``), below both the recipe and the checkpoint loader."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from vlm2om.runtime.errors import InputError

from vlm2om.exporters.core.options import RecipeOptions
from vlm2om.exporters.llm.common import LlmParts

if TYPE_CHECKING:  # torch-free at run time: the CLI parses these options before importing torch
    from torch import nn

    from vlm2om.graphs.eva_vit import EvaVitConfig
    from vlm2om.graphs.qformer import QFormerConfig

# VisualGLM's chat (SAT model/chat.py, the HF build_inputs_with_image): "<img></img>问：{q}\n答：",
# or with english=True "Q:"/"A:"; SAT keeps what follows the last answer tag of the decoded text.
_GLM = {"kind": "glm_qa", "sep": "\n", "image_open": "<img>", "image_close": "</img>",
        "suffix": ["[gMASK]", "<sop>"]}
PROMPTS = {"zh": {"template": "visualglm_zh", "roles": ["问：", "答："], "answer_split": "答：", **_GLM},
           "en": {"template": "visualglm_en", "roles": ["Q:", "A:"], "answer_split": "A:", **_GLM}}


@dataclass(frozen=True)
class ExportOptions(RecipeOptions):
    vision: EvaVitConfig | None = None  # sizes a checkpoint's shapes cannot tell (heads); default: real
    qformer: QFormerConfig | None = None
    vision_graphs: int | None = field(default=None, metadata={"help": (
        "Split the EVA ViT's layers over this many chained graphs (default 2 for --checkpoint, which keeps "
        "the export's memory near 2.5 GB; 1 for a preset).")})
    language: str = field(default="zh", metadata={"help": (
        "Prompt language: zh (问：/答：, VisualGLM's default) or en (Q:/A:, its chat(english=True)).")})
    tokenizer: str | None = field(default=None, metadata={"help": (
        "ChatGLM-6B's ice_text.model, for a SAT checkpoint (which ships none; default: ice_text.model in "
        "the checkpoint folder or the folder above it). A Hugging Face folder uses its own.")})

    def __post_init__(self):
        if self.language not in PROMPTS:
            raise InputError(f"--language {self.language}: choose one of {', '.join(PROMPTS)}")
        if self.vision_graphs is not None and self.vision_graphs < 1:
            raise InputError(f"--vision-graphs {self.vision_graphs}: must be >= 1")
        if self.tokenizer is not None and not Path(self.tokenizer).is_file():
            raise InputError(f"--tokenizer {self.tokenizer}: no such file")

    def vision_bounds(self, depth: int) -> list[tuple[int, int]]:
        """The SAT EVA's layer slices, one graph each (as MiniGPT-4's, see core/blip2.py)."""
        from vlm2om.exporters.core.blip2 import vision_bounds

        return vision_bounds(self.vision_graphs, self.checkpoint is not None, depth)


@dataclass
class VisualGLMParts:
    """What is known before any weight is read; each ``build_*`` makes one graph's module
    (reading only its weights) so an export holds one graph's weights at a time. The ChatGLM
    tokenizer's ids (bos, eos, id offset) are in ``llm.spec.tokenizer``."""

    vision_cfg: EvaVitConfig
    qformer_cfg: QFormerConfig
    llm: LlmParts
    tokenizer: bytes  # the ice_text.model SentencePiece bytes
    source: dict
    vision_bounds: list[tuple[int, int]]  # SAT EVA layer slices, one graph each
    build_vision: Callable[[int], nn.Module]  # slice index -> SatEvaVisionEncoder
    build_bridge: Callable[[], nn.Module]  # SatQFormer + glm_proj
