"""EVA-ViT-g as SwissArmyTransformer (SAT) builds it for VisualGLM-6B, plus BLIP-2's ``ln_vision``.

Same sizes and math as the LAVIS EVA of MiniGPT-4 (``EvaVitConfig``: 39 pre-LN layers, width 1408,
16 heads, MLP 6144 with exact GELU, eps 1e-6, no final norm, ln_vision eps 1e-5 on all 257 tokens),
but SAT stores it differently, and our parameters take SAT's shapes so that a checkpoint table is a
plain rename: ``query_key_value`` has a full bias (k included) and splits contiguous [Q|K|V]; the
CLS token is the one row of ``word_embeddings`` [1, W]; ``position_embeddings`` [257, W] is added
whole. A separate file rather than flags on eva_vit.py because every one of these differs in
shape, and MappingTable maps names 1:1 without reshaping. ``SatSelfAttention``/``SatMlp`` are the
SAT BaseTransformer pieces that the SAT Q-Former (sat_qformer.py) shares.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .common import LayerNorm32, attention, merge_heads, split_heads
from .eva_vit import EvaVitConfig


class SatSelfAttention(nn.Module):
    """SAT ``SelfAttention``: one [3W, W] projection (with bias) split [Q|K|V], then ``dense``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (width // heads) ** -0.5
        self.query_key_value = nn.Linear(width, 3 * width)
        self.dense = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.query_key_value(x).chunk(3, dim=-1))
        return self.dense(merge_heads(attention(q, k, v, self.scale)))


class SatMlp(nn.Module):
    """SAT ``MLP`` with VisualGLM's activation (exact GELU, ``F.gelu``)."""

    def __init__(self, width: int, inner: int):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(width, inner)
        self.dense_4h_to_h = nn.Linear(inner, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class SatPreLNLayer(nn.Module):
    """SAT ``BaseTransformerLayer`` with layernorm_order "pre"."""

    def __init__(self, cfg: EvaVitConfig):
        super().__init__()
        self.input_layernorm = LayerNorm32(cfg.width, eps=cfg.eps)
        self.attention = SatSelfAttention(cfg.width, cfg.heads)
        self.post_attention_layernorm = LayerNorm32(cfg.width, eps=cfg.eps)
        self.mlp = SatMlp(cfg.width, cfg.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class PatchEmbedding(nn.Module):
    """SAT ``ImagePatchEmbeddingMixin``'s Conv2d; [B, 3, S, S] -> [B, (S/p)^2, W]."""

    def __init__(self, cfg: EvaVitConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class SatEvaVisionEncoder(nn.Module):
    """pixel_values [B, 3, S, S] -> image_embeds [B, 1 + (S/p)^2, W] (after ln_vision).

    ``blocks=(start, stop)`` builds one slice, as ``EvaVisionEncoder`` does: the slice from 0 holds
    the embeddings, the slice that ends the ViT holds ``ln_vision``; local layer j is SAT's
    ``transformer.layers.{start + j}``.
    """

    def __init__(self, cfg: EvaVitConfig = EvaVitConfig(), blocks: tuple[int, int] | None = None):
        super().__init__()
        start, stop = blocks or (0, cfg.depth)
        if not 0 <= start < stop <= cfg.depth:
            raise ValueError(f"SAT EVA layer slice [{start}, {stop}) is outside 0..{cfg.depth}")
        self.cfg, self.start, self.stop = cfg, start, stop
        if start == 0:
            self.word_embeddings = nn.Embedding(1, cfg.width)  # the CLS token (VisualGLM feeds id 0)
            self.position_embeddings = nn.Embedding(cfg.num_tokens, cfg.width)
            self.patch_embedding = PatchEmbedding(cfg)
        self.layers = nn.ModuleList(SatPreLNLayer(cfg) for _ in range(stop - start))
        if stop == cfg.depth:
            self.ln_vision = LayerNorm32(cfg.width, eps=cfg.ln_vision_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.start == 0:
            patches = self.patch_embedding(x)
            cls = self.word_embeddings.weight[None].expand(patches.shape[0], -1, -1)
            x = torch.cat([cls, patches], dim=1) + self.position_embeddings.weight
        for layer in self.layers:
            x = layer(x)
        return self.ln_vision(x) if self.stop == self.cfg.depth else x
