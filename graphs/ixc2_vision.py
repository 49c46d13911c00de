"""InternLM-XComposer2-4KHD's image side after the CLIP tower: the 2x2 merge of each 336 view,
the learned separators and ``vision_proj``, as one static graph per view (the runtime assembles
the views of an image, whose count varies, from its outputs).

The original (``build_mlp.py`` of internlm-xcomposer2-4khd-7b) runs the tower on the global view
and the h x w crops together, merges every 24x24 patch grid 2x2 into 12x12 tokens of 4 x 1024
channels (channel blocks in the order (0,0), (0,1), (1,0), (1,1) of each 2x2 cell), then lays out

    global 12 rows x (12 tokens + sub_GN)  |  glb_GN  |  12h rows x (12w tokens + sub_GN)

and projects that whole sequence with ``vision_proj`` (Linear 4096 -> 4096, GELU, Linear), a
token-wise MLP. Projecting each view's 144 tokens and the two separators apart gives the same
rows, so one graph of fixed shape serves every view::

    image_features [B, 576, 1024]  the tower's patch tokens of B views (CLS dropped)
 -> view_embeds    [B, 146, 4096]  rows 0..143: vision_proj of the merged 12x12 tokens, row-major;
                                   row 144: vision_proj(glb_GN); row 145: vision_proj(sub_GN)

InternLM-XComposer2-VL has no merge: ``MlpGeluProjector`` (1024 -> 4096) after its 490 px tower.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .projector import MlpGeluProjector, MlpGeluProjectorConfig


@dataclass(frozen=True)
class HdViewConfig:
    grid: int = 24  # patch grid of one 336 view (336 / 14)
    width: int = 1024  # the tower's width
    hidden: int = 4096  # the LLM's

    def __post_init__(self):
        if self.grid % 2:
            raise ValueError(f"the patch grid {self.grid} must be even for the 2x2 merge")

    @property
    def merged(self) -> int:
        """Tokens per side after the merge (12)."""
        return self.grid // 2

    @property
    def rows(self) -> int:
        """Rows of the graph's output: the merged tokens, then the two separators (146)."""
        return self.merged ** 2 + 2


class HdViewProjector(nn.Module):
    """image_features [B, grid^2, width] -> view_embeds [B, merged^2 + 2, hidden] (see the module
    docstring). Parameter names: the checkpoint's ``plora_glb_GN``/``plora_sub_GN`` without the
    prefix, and ``proj.linear_{1,2}`` for ``vision_proj.{0,2}``."""

    def __init__(self, cfg: HdViewConfig = HdViewConfig()):
        super().__init__()
        self.cfg = cfg
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, 4 * cfg.width))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, 4 * cfg.width))
        self.proj = MlpGeluProjector(MlpGeluProjectorConfig(4 * cfg.width, cfg.hidden))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        b, g = image_features.shape[0], self.cfg.merged
        x = image_features.reshape(b, g, 2, g, 2, self.cfg.width).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, g * g, 4 * self.cfg.width)
        seps = torch.cat([self.glb_GN.reshape(1, 1, -1), self.sub_GN.reshape(1, 1, -1)], dim=1).to(x.dtype)
        return self.proj(torch.cat([x, seps.expand(b, 2, -1)], dim=1))
