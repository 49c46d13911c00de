"""MiniGPT-4's export options and the record of what an export builds (``MiniGPT4Parts``),
below both the recipe and the checkpoint loader, which make Parts from a preset or a folder."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from vlm2om.runtime.errors import InputError

from vlm2om.exporters.llm.common import LlmParts

from vlm2om.exporters.core.options import RecipeOptions

if TYPE_CHECKING:  # torch-free at run time: the CLI parses these options before importing torch
    from torch import nn

    from vlm2om.graphs.eva_vit import EvaVitConfig
    from vlm2om.graphs.qformer import QFormerConfig


@dataclass(frozen=True)
class ExportOptions(RecipeOptions):
    vision: EvaVitConfig | None = None  # checkpoint sizes the shapes cannot tell (heads); default: real
    qformer: QFormerConfig | None = None
    vision_graphs: int | None = field(default=None, metadata={"help": (
        "Split EVA-ViT-g's blocks over this many chained graphs (default 2 for --checkpoint, which keeps "
        "the export's memory near 2.5 GB; 1 for a preset).")})

    def __post_init__(self):
        if self.vision_graphs is not None and self.vision_graphs < 1:
            raise InputError(f"--vision-graphs {self.vision_graphs}: must be >= 1")

    def vision_bounds(self, depth: int) -> list[tuple[int, int]]:
        from vlm2om.exporters.core.blip2 import vision_bounds

        return vision_bounds(self.vision_graphs, self.checkpoint is not None, depth)


@dataclass
class MiniGPT4Parts:
    """What is known before any weight is read; each ``build_*`` makes one graph's module
    (reading only its weights) so an export holds one graph's weights at a time."""

    vision_cfg: EvaVitConfig
    qformer_cfg: QFormerConfig
    llm: LlmParts
    tokenizer: bytes
    source: dict
    vision_bounds: list[tuple[int, int]]  # EVA block slices, one graph each
    build_vision: Callable[[int], nn.Module]  # slice index -> module
    build_bridge: Callable[[], nn.Module]
