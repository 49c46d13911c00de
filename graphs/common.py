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


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32 with fp32 parameters whatever the activations' dtype.

    LAVIS keeps BLIP-2's LayerNorms fp32 when it halves the ViT (``convert_weights_to_fp16``
    touches only Linear/Conv) and runs them in fp32 under autocast; the variance of 1408-wide
    activations also overflows fp16. In an fp32 graph the casts are no-ops that onnxsim drops.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                                       self.bias.float(), self.eps)
        return out.to(x.dtype)


def cast_module(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module.to(dtype)`` except LayerNorm32 parameters, which stay fp32."""
    module.to(dtype)
    for m in module.modules():
        if isinstance(m, LayerNorm32):
            m.float()
    return module.eval()


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


def group_cache(cache: tuple, layers: int, kv_layout: str, logits_index=None):
    """A decoder group's ``*cache`` arguments as (past key and value per layer, logits_index):
    ``stacked`` passes one ``past_kv`` [L, 2, ...] (split here, one Split in the graph),
    ``per_layer`` ``past_key_0, past_value_0, ...``; the last group's ``logits_index`` follows."""
    stacked = kv_layout == "stacked"
    extra = cache[1:] if stacked else cache[2 * layers:]
    past = cache[0].flatten(0, 1).unbind(0) if stacked else cache[:2 * layers]
    return past, (extra[0] if extra else logits_index)

