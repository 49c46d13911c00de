"""Tiny helpers shared by every architecture file (kept deliberately small)."""
from __future__ import annotations

import torch
from torch import nn


def init_random_(module: nn.Module, seed: int, std: float = 0.02) -> nn.Module:
    """Seeded random weights for toy presets: normal(std) for matrices, ones/zeros for norms.

    Norm weights stay at 1 so activations keep a sane scale through deep stacks.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            is_norm = "norm" in name.lower() or "ln_" in name.lower() or "LayerNorm" in name
            if is_norm and leaf == "weight":
                p.fill_(1.0)
            elif is_norm and leaf == "bias":
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v with the softmax in fp32 (fp16 breaks there on ATC)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, heads*D] -> [B, heads, T, D]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, T, D] -> [B, T, heads*D]."""
    return x.transpose(1, 2).flatten(2)
