"""EVA-ViT-g image encoder as used by BLIP-2 / MiniGPT-4, plus BLIP-2's ``ln_vision``.

Reference: LAVIS ``eva_vit.py`` (create_eva_vit_g): patch 14, width 1408, 39 blocks,
16 heads of 88, MLP 6144 with exact GELU, qkv without bias plus separate q/v biases
(no k bias), absolute position embedding, no layer-scale, no rel-pos bias, no final norm.
``ln_vision`` (eps 1e-5) is applied to all 257 tokens after the last block.
Parameter names equal the LAVIS checkpoint's, so mapping tables stay readable.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .common import LayerNorm32, attention, merge_heads, split_heads


@dataclass(frozen=True)
class EvaVitConfig:
    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 39
    heads: int = 16
    mlp_dim: int = 6144  # int(1408 * 4.3637)
    eps: float = 1e-6
    ln_vision_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1


class PatchEmbed(nn.Module):
    def __init__(self, cfg: EvaVitConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, W]


class EvaAttention(nn.Module):
    def __init__(self, cfg: EvaVitConfig):
        super().__init__()
        self.heads = cfg.heads
        self.scale = (cfg.width // cfg.heads) ** -0.5
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(cfg.width))
        self.v_bias = nn.Parameter(torch.zeros(cfg.width))
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).chunk(3, dim=-1)  # contiguous [Q|K|V]
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))
        return self.proj(merge_heads(attention(q, k, v, self.scale)))


class EvaMlp(nn.Module):
    def __init__(self, cfg: EvaVitConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EvaBlock(nn.Module):
    def __init__(self, cfg: EvaVitConfig):
        super().__init__()
        self.norm1 = LayerNorm32(cfg.width, eps=cfg.eps)
        self.attn = EvaAttention(cfg)
        self.norm2 = LayerNorm32(cfg.width, eps=cfg.eps)
        self.mlp = EvaMlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EvaVisionEncoder(nn.Module):
    """pixel_values [B, 3, S, S] -> image_embeds [B, 1 + (S/14)^2, width] (after ln_vision).

    ``blocks=(start, stop)`` builds only that slice of the ViT, so a large encoder can be
    exported as a chain of smaller graphs: the slice that starts at 0 takes pixels (patch
    embedding, CLS, positions), later slices take the previous slice's tokens, and the slice
    that ends the ViT adds ``ln_vision``. Local block j is the checkpoint's block start + j.
    """

    def __init__(self, cfg: EvaVitConfig = EvaVitConfig(), blocks: tuple[int, int] | None = None):
        super().__init__()
        start, stop = blocks or (0, cfg.depth)
        if not 0 <= start < stop <= cfg.depth:
            raise ValueError(f"EVA block slice [{start}, {stop}) is outside 0..{cfg.depth}")
        self.cfg, self.start, self.stop = cfg, start, stop
        if start == 0:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.width))
            self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(EvaBlock(cfg) for _ in range(stop - start))
        if stop == cfg.depth:
            self.ln_vision = LayerNorm32(cfg.width, eps=cfg.ln_vision_eps)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The ViT slice alone (no ln_vision): what LAVIS' ``visual_encoder`` returns for a whole one."""
        if self.start == 0:
            x = self.patch_embed(x)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trunk(x)
        # ln_vision runs in fp32 in MiniGPT-4 (a LayerNorm subclass that casts back).
        return self.ln_vision(x) if self.stop == self.cfg.depth else x
