"""Llama decoder (Vicuna) with the explicit KV-cache contract of DESIGN.md.

Reference: transformers ``LlamaForCausalLM`` (RMSNorm with fp32 variance, rotate-half RoPE,
SwiGLU MLP, fp32 softmax). The decoder is cut into *groups* of consecutive layers so that
each exported file stays small; the runtime chains the groups.

One group's graph::

    hidden_states  [B, S, H]        inputs_embeds for group 0, the previous group's output after
    position_ids   [B, S]    int64  absolute positions of the S new tokens
    attention_mask [B, C]    float  1 where a cache slot holds a valid past token, else 0
    past_kv        [L, 2, B, KVH, C, D]   keys (after RoPE) and values of the cache slots
                   (or, kv_layout per_layer: past_key_i, past_value_i [B, KVH, C, D] per layer)
 (last group) logits_index [B] int64  the one new position per row whose logits are wanted
 -> hidden_states [B, S, H] | logits [B, V] float32 (last group)
    present_kv     [L, 2, B, KVH, S, D]   keys and values of the S new tokens only
                   (per_layer: present_key_i, present_value_i [B, KVH, S, D])

Decoding needs the next-token logits after a prompt's last position only, so the last group
gathers that row before its norm and lm_head: a padded prefill chunk of S positions then costs
one lm_head row instead of S (a [B, S, V] output is also the largest buffer a batch would hold).

New tokens attend to valid cache slots and to new tokens whose position is not larger
than their own, so right padding (positions that keep counting) is never seen by a real
token. Both RoPE and the causal mask come from ``position_ids`` (a Gather and a compare):
no Range/Trilu and no shape-dependent control flow, which keeps the graph ATC-friendly.
KV is stacked per group so a gear lists few dynamic dims (ATC ``--dynamic_dims``), or per layer
so that no step copies the cache (see ``LlamaDecoderGroup``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .common import causal_biases, check_group, group_cache, group_outputs, head_logits



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
    """cos/sin [length, head_dim] in the rotate-half layout of transformers' Llama: float32 inverse
    frequencies and angles as transformers computes them, but each of pow, cos and sin evaluated
    in float64 and rounded once. torch's float32 kernels take vectorised or scalar paths by memory
    layout, whose results differ in the last bit, which position x inv_freq grows to ~1e-4: the
    same export must give the same bytes."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = (1.0 / (theta ** exponent.double())).float()
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1).double()
    return emb.cos().float(), emb.sin().float()


def rotate_half_matrix(head_dim: int) -> torch.Tensor:
    """R with ``x @ R == cat(-x2, x1)`` (transformers' rotate_half): one exact MatMul in the
    graph instead of two Slices, a Neg and a Concat per use."""
    half = head_dim // 2
    r = torch.zeros(head_dim, head_dim)
    r[torch.arange(half) + half, torch.arange(half)] = -1.0
    r[torch.arange(half), torch.arange(half) + half] = 1.0
    return r


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, cfg.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, cfg.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.heads * d, cfg.hidden, bias=False)

    def forward(self, x, rope, bias_past, bias_new, past_k, past_v, dims):
        """x [B,S,H]; rope = (cos, sin [B,1,S,D], R [D,D]); bias_past [B,1,1,C];
        bias_new [B,1,S,S]; past [B,KVH,C,D]; dims = (B, S, C) -> out [B,S,H], new k, v [B,KVH,S,D].

        ``dims`` come from the group's inputs, so every reshape in every layer uses the same
        shape values and the exported graph computes them once instead of per tensor."""
        cfg = self.cfg
        b, s, c = dims
        h, g, d = cfg.heads, cfg.kv_heads, cfg.head_dim
        cos, sin, rot = rope
        # One projection for q, k and v, with the softmax scale folded into q's rows (the export
        # stores the packed weight), one reshape and transpose, and RoPE on q and k together.
        w = torch.cat([self.q_proj.weight * d ** -0.5, self.k_proj.weight, self.v_proj.weight])
        qkv = F.linear(x, w).reshape(b, s, h + 2 * g, d).transpose(1, 2)  # [B, h+2g, S, D]
        qk, v = qkv.split([h + g, g], dim=1)
        qk = qk * cos + torch.matmul(qk, rot) * sin
        q, k = qk.split([h, g], dim=1)
        # Scores against the cache and against the new keys are computed apart, so the cache is
        # never concatenated (copied) per step; grouped-query heads are folded into the query
        # rows instead of repeating the cache (no reshapes at all without grouping).
        rows, grouped = (h // g) * s, g != h
        qg = q.reshape(b, g, rows, d) if grouped else q
        past = torch.matmul(qg, past_k.transpose(-1, -2))
        new = torch.matmul(qg, k.transpose(-1, -2))
        if grouped:
            past, new = past.reshape(b, h, s, c), new.reshape(b, h, s, s)
        probs = torch.softmax(torch.cat([past.float() + bias_past, new.float() + bias_new], dim=-1), dim=-1)
        p_past, p_new = probs.to(v.dtype).split([c, s], dim=-1)
        if grouped:
            p_past, p_new = p_past.reshape(b, g, rows, c), p_new.reshape(b, g, rows, s)
        out = torch.matmul(p_past, past_v) + torch.matmul(p_new, v)
        if grouped:
            out = out.reshape(b, h, s, d)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, h * d)), k, v


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

    def forward(self, x, rope, bias_past, bias_new, past_k, past_v, dims):
        h, k, v = self.self_attn(self.input_layernorm(x), rope, bias_past, bias_new, past_k, past_v, dims)
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
    """Layers ``[start, stop)``; the group that ends the model adds the final norm and lm_head.

    ``kv_layout``: ``stacked`` takes the group's cache as one ``past_kv`` [L, 2, B, KVH, C, D] and
    returns one ``present_kv`` (few dynamic dims per ATC gear, but the graph splits the stack
    into layers, which copies the whole cache every step on onnxruntime); ``per_layer`` takes
    ``past_key_i``, ``past_value_i`` [B, KVH, C, D] per layer and returns ``present_key_i``,
    ``present_value_i`` (no copy of the cache; two dynamic cache dims per layer in a gear)."""

    def __init__(self, cfg: LlamaConfig, start: int, stop: int, rope_length: int | None = None,
                 kv_layout: str = "stacked"):
        super().__init__()
        check_group(start, stop, cfg.layers, kv_layout)
        self.cfg, self.start, self.stop, self.kv_layout = cfg, start, stop, kv_layout
        self.layers = nn.ModuleList(LlamaLayer(cfg) for _ in range(stop - start))
        self.is_last = stop == cfg.layers
        if self.is_last:
            self.norm = RMSNorm(cfg.hidden, cfg.rms_eps)
            self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.init_buffers(rope_length or cfg.max_positions)

    def init_buffers(self, rope_length: int) -> None:
        """(Re)create the constant tables; a loader that built the group on the meta device calls it."""
        cos, sin = rope_table(self.cfg.head_dim, rope_length, self.cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("rope_rot", rotate_half_matrix(self.cfg.head_dim), persistent=False)

    def forward(self, hidden_states, position_ids, attention_mask, *cache, logits_index=None):
        """``cache``: ``past_kv`` (stacked) or ``past_key_0, past_value_0, ...`` (per layer), then
        ``logits_index`` for the last group; without it (the torch reference) the logits of every
        position [B, S, V]."""
        past, logits_index = group_cache(cache, len(self.layers), self.kv_layout, logits_index)
        dtype = hidden_states.dtype
        cos = self.rope_cos[position_ids].unsqueeze(1).to(dtype)  # [B, 1, S, D]
        sin = self.rope_sin[position_ids].unsqueeze(1).to(dtype)
        bias_past, bias_new = causal_biases(position_ids, attention_mask)
        rope = (cos, sin, self.rope_rot.to(dtype))
        dims = (hidden_states.shape[0], hidden_states.shape[1], attention_mask.shape[1])
        x, present = hidden_states, []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, rope, bias_past, bias_new, past[2 * i], past[2 * i + 1], dims)
            present += [torch.stack([k, v])] if self.kv_layout == "stacked" else [k, v]
        if self.is_last:  # the Llama head is narrow (32000 rows): one MatMul
            x = head_logits(x, logits_index, self.norm, self.lm_head)
        return group_outputs(x, present, self.kv_layout)
