"""BLIP-2 Q-Former, query branch only, as MiniGPT-4 runs it.

Reference: LAVIS/MiniGPT-4 ``Qformer.py`` with bert-base sizes (768, 12 layers, 12 heads,
FFN 3072, exact GELU, LayerNorm eps 1e-12), cross-attention to the image on every
``cross_every``-th layer starting at 0 (key/value from the 1408-wide image features).
MiniGPT-4 deletes the text FFN, word and position embeddings: the 32 learned query tokens
go through ``embeddings.LayerNorm`` and the post-LN layers with ``intermediate_query`` /
``output_query``. The result is ``last_hidden_state`` [B, 32, 768] (no pooler).
Parameter names follow ``Qformer.bert.*`` in the BLIP-2 checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .common import LayerNorm32, attention, merge_heads, split_heads


@dataclass(frozen=True)
class QFormerConfig:
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    ffn: int = 3072
    encoder_width: int = 1408
    num_query: int = 32
    cross_every: int = 2
    eps: float = 1e-12

    def has_cross(self, layer: int) -> bool:
        return layer % self.cross_every == 0


class SelfOrCross(nn.Module):
    """BERT ``self`` attention projections; key/value read ``kv_width`` features."""

    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.heads = cfg.heads
        self.scale = (cfg.hidden // cfg.heads) ** -0.5
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(kv_width, cfg.hidden)
        self.value = nn.Linear(kv_width, cfg.hidden)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        q = split_heads(self.query(x), self.heads)
        k = split_heads(self.key(kv), self.heads)
        v = split_heads(self.value(kv), self.heads)
        return merge_heads(attention(q, k, v, self.scale))


class DenseLN(nn.Module):
    """BERT's ``output`` block: LayerNorm(dense(x) + residual)."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = LayerNorm32(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class AttentionBlock(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.self = SelfOrCross(cfg, kv_width)
        self.output = DenseLN(cfg.hidden, cfg.hidden, cfg.eps)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, kv), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, index: int):
        super().__init__()
        self.attention = AttentionBlock(cfg, cfg.hidden)
        if cfg.has_cross(index):
            self.crossattention = AttentionBlock(cfg, cfg.encoder_width)
        self.intermediate_query = Intermediate(cfg)
        self.output_query = DenseLN(cfg.ffn, cfg.hidden, cfg.eps)

    def forward(self, x: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x)
        if hasattr(self, "crossattention"):
            x = self.crossattention(x, image_embeds)
        return self.output_query(self.intermediate_query(x), x)


class QFormer(nn.Module):
    """image_embeds [B, N, encoder_width] -> query_output [B, num_query, hidden]."""

    def __init__(self, cfg: QFormerConfig = QFormerConfig()):
        super().__init__()
        self.cfg = cfg
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query, cfg.hidden))
        self.embeddings_LayerNorm = LayerNorm32(cfg.hidden, eps=cfg.eps)
        self.layer = nn.ModuleList(QFormerLayer(cfg, i) for i in range(cfg.layers))

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.embeddings_LayerNorm(self.query_tokens.expand(image_embeds.shape[0], -1, -1))
        for layer in self.layer:
            x = layer(x, image_embeds)
        return x
