"""BLIP-2 Q-Former as SwissArmyTransformer (SAT) builds it for VisualGLM-6B.

The sizes are MiniGPT-4's (``QFormerConfig``: 768 wide, 12 layers of 12 heads, FFN 3072, exact GELU,
eps 1e-12, cross-attention to the 1408-wide image on even layers, 32 query tokens, no position
embeddings), and the math is the same BERT post-LN stack; SAT only stores it differently, and our
parameters take SAT's names and shapes so that a checkpoint table is a plain rename:
- the query tokens are ``word_embeddings`` [32, 768] (VisualGLM feeds ids 0..31);
- self-attention is one [Q|K|V] ``query_key_value``; cross-attention has ``query`` and one
  ``key_value`` [1536, 1408] split [K|V];
- the LayerNorms sit one layer later than BERT's: layer i's ``input_layernorm`` runs first (layer
  0's is BERT's embeddings LayerNorm, layer i's is layer i-1's output LayerNorm) and
  ``final_layernorm`` is the last layer's output LayerNorm.
"""
from __future__ import annotations

import torch
from torch import nn

from .common import LayerNorm32, attention, merge_heads, split_heads
from .qformer import QFormerConfig
from .sat_vit import SatMlp, SatSelfAttention


class SatCrossAttention(nn.Module):
    """SAT ``CrossAttention``: queries from the Q-Former, [K|V] from the image features."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.heads = cfg.heads
        self.scale = (cfg.hidden // cfg.heads) ** -0.5
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key_value = nn.Linear(cfg.encoder_width, 2 * cfg.hidden)
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        q = split_heads(self.query(x), self.heads)
        k, v = (split_heads(t, self.heads) for t in self.key_value(image_embeds).chunk(2, dim=-1))
        return self.dense(merge_heads(attention(q, k, v, self.scale)))


class SatPostLNLayer(nn.Module):
    """SAT ``BaseTransformerLayer`` with layernorm_order "post" (cross-attention where is_decoder)."""

    def __init__(self, cfg: QFormerConfig, index: int):
        super().__init__()
        self.input_layernorm = LayerNorm32(cfg.hidden, eps=cfg.eps)
        self.attention = SatSelfAttention(cfg.hidden, cfg.heads)
        self.post_attention_layernorm = LayerNorm32(cfg.hidden, eps=cfg.eps)
        if cfg.has_cross(index):
            self.cross_attention = SatCrossAttention(cfg)
            self.post_cross_attention_layernorm = LayerNorm32(cfg.hidden, eps=cfg.eps)
        self.mlp = SatMlp(cfg.hidden, cfg.ffn)

    def forward(self, x: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        a = self.input_layernorm(x)
        m = self.post_attention_layernorm(a + self.attention(a))
        if hasattr(self, "cross_attention"):
            m = self.post_cross_attention_layernorm(m + self.cross_attention(m, image_embeds))
        return m + self.mlp(m)


class SatQFormer(nn.Module):
    """image_embeds [B, N, encoder_width] -> query_output [B, num_query, hidden] (after final_layernorm)."""

    def __init__(self, cfg: QFormerConfig = QFormerConfig()):
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.num_query, cfg.hidden)
        self.layers = nn.ModuleList(SatPostLNLayer(cfg, i) for i in range(cfg.layers))
        self.final_layernorm = LayerNorm32(cfg.hidden, eps=cfg.eps)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings.weight[None].expand(image_embeds.shape[0], -1, -1)
        for layer in self.layers:
            x = layer(x, image_embeds)
        return self.final_layernorm(x)
