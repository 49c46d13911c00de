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



KV_LAYOUTS = ("stacked", "per_layer")
# A vocabulary projection wider than this many rows is computed in slices of it and concatenated
# (ChatGLM's 130528, InternLM2's 92544 rows -> 8, 6 MatMuls): no single weight of the last group
# is then larger than 128 MiB in fp16, which keeps the export's verification on onnxruntime's CPU
# kernels (fp32 copies of fp16 weights) near the group's own size.
LM_HEAD_ROWS = 16384


def check_group(start: int, stop: int, layers: int, kv_layout: str) -> None:
    """A decoder group's bounds and cache layout, as every LLM kind's group takes them."""
    if not 0 <= start < stop <= layers:
        raise ValueError(f"layer group [{start}, {stop}) is outside 0..{layers}")
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout {kv_layout!r}: choose one of {KV_LAYOUTS}")


def group_outputs(x: torch.Tensor, present: list[torch.Tensor], kv_layout: str) -> tuple:
    """(hidden or logits, the new keys and values as ``kv_layout`` returns them)."""
    if kv_layout == "stacked":
        return x, torch.stack(present)
    return (x, *present)


def head_logits(x: torch.Tensor, logits_index, norm: nn.Module, head: nn.Linear,
                rows: int | None = None) -> torch.Tensor:
    """The last group's logits: the ``logits_index`` position per row (all of them without it),
    the final norm, the head (in slices of ``rows`` rows where it is wider; ``LM_HEAD_ROWS`` for
    the wide vocabularies), in fp32 so that an argmax sees no fp16 ties."""
    if logits_index is not None:
        x = x.gather(1, logits_index[:, None, None].expand(-1, 1, x.shape[-1]))[:, 0]
    x = norm(x)
    w = head.weight
    if rows is not None and w.shape[0] > rows:
        x = torch.cat([torch.nn.functional.linear(x, part) for part in w.split(rows)], dim=-1)
    else:
        x = head(x)
    return x.float() if x.dtype != torch.float32 else x


def causal_biases(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive fp32 attention biases of a causal group: the valid cache slots [B, 1, 1, C], and
    the new tokens causal by position [B, 1, S, S] (0 where seen, finfo.min elsewhere)."""
    zero, neg = torch.zeros((), dtype=torch.float32), torch.full((), torch.finfo(torch.float32).min)
    past = torch.where(attention_mask[:, None, None, :] > 0.5, zero, neg)
    new = torch.where((position_ids[:, None, :] <= position_ids[:, :, None]).unsqueeze(1), zero, neg)
    return past, new
