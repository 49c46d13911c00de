"""Projectors between an image encoder and the LLM's embedding space.

MiniGPT-4's ``llama_proj`` is one Linear (768 -> 4096 for Vicuna-7B). ``Bridge`` chains
an encoder-side module (the Q-Former) with the projection so that it exports as one graph,
the split the seeds' deployments use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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
