"""Llama decoder (Vicuna) with the explicit KV-cache contract of DESIGN.md.

Reference: transformers ``LlamaForCausalLM`` (RMSNorm with fp32 variance, rotate-half RoPE,
SwiGLU MLP, fp32 softmax). The decoder is cut into *groups* of consecutive layers so that
each exported file stays small; the runtime chains the groups.

One group's graph::

    hidden_states  [B, S, H]        inputs_embeds for group 0, the previous group's output after
    position_ids   [B, S]    int64  absolute positions of the S new tokens
    attention_mask [B, C]    float  1 where a cache slot holds a valid past token, else 0
    past_kv        [L, 2, B, KVH, C, D]   keys (after RoPE) and values of the cache slots
 -> hidden_states | logits [B, S, H | V]
    present_kv     [L, 2, B, KVH, S, D]   keys and values of the S new tokens only

New tokens attend to valid cache slots and to new tokens whose position is not larger
than their own, so right padding (positions that keep counting) is never seen by a real
token. Both RoPE and the causal mask come from ``position_ids`` (a Gather and a compare):
no Range/Trilu and no shape-dependent control flow, which keeps the graph ATC-friendly.
KV is stacked per group so a gear lists few dynamic dims (ATC ``--dynamic_dims``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .common import attention, merge_heads, split_heads


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32
    ffn: int = 11008
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_positions: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_table(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [length, head_dim] in the rotate-half layout of transformers' Llama."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, cfg.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, cfg.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.heads * d, cfg.hidden, bias=False)

    def forward(self, x, cos, sin, bias, past_k, past_v):
        """x [B,S,H]; cos/sin [B,1,S,D]; bias [B,1,S,C+S]; past [B,KVH,C,D] -> out, k, v."""
        cfg = self.cfg
        q = split_heads(self.q_proj(x), cfg.heads)
        k = split_heads(self.k_proj(x), cfg.kv_heads)
        v = split_heads(self.v_proj(x), cfg.kv_heads)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        keys = torch.cat([past_k, k], dim=2)
        values = torch.cat([past_v, v], dim=2)
        if cfg.kv_heads != cfg.heads:  # grouped-query attention
            rep = cfg.heads // cfg.kv_heads
            keys = keys.repeat_interleave(rep, dim=1)
            values = values.repeat_interleave(rep, dim=1)
        out = attention(q, keys, values, cfg.head_dim ** -0.5, bias)
        return self.o_proj(merge_heads(out)), k, v


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden, cfg.ffn, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.ffn, bias=False)
        self.down_proj = nn.Linear(cfg.ffn, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, bias, past_k, past_v):
        h, k, v = self.self_attn(self.input_layernorm(x), cos, sin, bias, past_k, past_v)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class LlamaEmbedding(nn.Module):
    """input_ids [B, S] int64 -> inputs_embeds [B, S, H]."""

    def __init__(self, cfg: LlamaConfig = LlamaConfig()):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class LlamaDecoderGroup(nn.Module):
    """Layers ``[start, stop)``; the group that ends the model adds the final norm and lm_head."""

    def __init__(self, cfg: LlamaConfig, start: int, stop: int, rope_length: int | None = None):
        super().__init__()
        if not 0 <= start < stop <= cfg.layers:
            raise ValueError(f"layer group [{start}, {stop}) is outside 0..{cfg.layers}")
        self.cfg, self.start, self.stop = cfg, start, stop
        self.layers = nn.ModuleList(LlamaLayer(cfg) for _ in range(stop - start))
        self.is_last = stop == cfg.layers
        if self.is_last:
            self.norm = RMSNorm(cfg.hidden, cfg.rms_eps)
            self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        cos, sin = rope_table(cfg.head_dim, rope_length or cfg.max_positions, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, hidden_states, position_ids, attention_mask, past_kv):
        dtype = hidden_states.dtype
        cos = self.rope_cos[position_ids].unsqueeze(1).to(dtype)  # [B, 1, S, D]
        sin = self.rope_sin[position_ids].unsqueeze(1).to(dtype)
        # Additive bias [B, 1, S, C + S], kept in fp32: valid cache slots, then causal by position.
        neg = torch.finfo(torch.float32).min
        past_ok = attention_mask[:, None, None, :] > 0.5
        new_ok = (position_ids[:, None, :] <= position_ids[:, :, None]).unsqueeze(1)
        past_ok = past_ok.expand(-1, -1, new_ok.shape[2], -1)
        ok = torch.cat([past_ok, new_ok], dim=-1)
        bias = torch.where(ok, torch.zeros((), dtype=torch.float32), torch.full((), neg))
        x, present = hidden_states, []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, bias, past_kv[i, 0], past_kv[i, 1])
            present.append(torch.stack([k, v]))
        if self.is_last:
            x = self.lm_head(self.norm(x))
        return x, torch.stack(present)
