"""Projectors between an image encoder and the LLM's embedding space.

MiniGPT-4's ``llama_proj`` is one Linear (768 -> 4096 for Vicuna-7B). LLaVA-1.5's
``mlp2x_gelu`` is Linear -> exact GELU -> Linear (1024 -> 4096 -> 4096). ``Bridge`` chains
an encoder-side module (the Q-Former, or a vision tower) with a projector so that they
export as one graph when a deployment wants them fused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class LinearProjectorConfig:
    in_dim: int = 768
    out_dim: int = 4096


class LinearProjector(nn.Module):
    """[B, T, in_dim] -> [B, T, out_dim]."""

    def __init__(self, cfg: LinearProjectorConfig = LinearProjectorConfig()):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(cfg.in_dim, cfg.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Bridge(nn.Module):
    """Sequential composition exported as one graph: image features -> LLM embeddings."""

    def __init__(self, encoder: nn.Module, projector: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(image_embeds))


@dataclass(frozen=True)
class MlpGeluProjectorConfig:
    """LLaVA-1.5's ``mm_projector_type='mlp2x_gelu'`` at Vicuna-7B size."""

    in_dim: int = 1024
    out_dim: int = 4096


class MlpGeluProjector(nn.Module):
    """[B, T, in_dim] -> [B, T, out_dim]: linear_1 -> GELU (exact, erf) -> linear_2.

    Parameter names are llava-hf's ``multi_modal_projector.linear_{1,2}``; the original LLaVA
    checkpoint calls them ``model.mm_projector.0`` and ``model.mm_projector.2`` (index 1 is
    the parameter-free GELU of its ``nn.Sequential``).
    """

    def __init__(self, cfg: MlpGeluProjectorConfig = MlpGeluProjectorConfig()):
        super().__init__()
        self.cfg = cfg
        self.linear_1 = nn.Linear(cfg.in_dim, cfg.out_dim)
        self.linear_2 = nn.Linear(cfg.out_dim, cfg.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))
