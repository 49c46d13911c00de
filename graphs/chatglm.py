"""ChatGLM-6B decoder (VisualGLM-6B's LLM) with the explicit KV-cache contract of DESIGN.md.

Reference: THUDM's ``modeling_chatglm.py`` and SwissArmyTransformer's ``ChatGLMModel`` (the same
math): GLM blocks with alpha = sqrt(2 * layers) residual scaling on the *normed* input, a tanh-GELU
MLP (not gated), the head-interleaved ``query_key_value`` of the HF checkpoint ([q_h | k_h | v_h]
per head), 2-D rotary positions and the prefix-LM mask. One group's graph::

    hidden_states  [B, S, H]        inputs_embeds for group 0, the previous group's output after
    position_ids   [B, 2, S] int64  row 0: positions (the context counts 0.., every token from <sop>
                                    on has the [gMASK] index); row 1: block positions (0 in the
                                    context, 1, 2, ... from <sop> on)
    attention_mask [B, C]    float  1 where a cache slot holds a valid past token, else 0
    past_kv [L, 2, B, heads, C, D]   the group's keys (after RoPE) and values (or, kv_layout
                                    per_layer: past_key_i, past_value_i [B, heads, C, D])
 (last group) logits_index [B] int64  the one new position per row whose logits are wanted
 -> hidden_states [B, S, H] | logits [B, V] float32 (last group)
    present_kv [L, 2, B, heads, S, D]   the S new tokens only (per_layer: present_key_i, present_value_i)

The prefix-LM mask needs no input of its own: ChatGLM derives its block positions and its mask
from the same context length, and a new token j is visible to a new token i exactly when
``block_j <= block_i`` (context tokens, block 0, see each other both ways; tokens from <sop> on see
the context and their predecessors). Right padding must keep counting its block positions (then no
real token sees it), and all of a context must be in one chunk: a context token cannot see context
tokens of a later chunk. Valid cache slots are visible to every new token.

fp16 details kept from the original because they change fp16 numbers: q is divided by
sqrt(D) * (layer_id + 1) after RoPE (not folded into the weights, whose scaled values would be
subnormal in fp16), scores are computed in the activation dtype, masked with -10000 there, then
upcast to fp32 and multiplied back by (layer_id + 1) before the softmax. No Range/Trilu/If: the
RoPE tables are Gathers, the masks are compares and Wheres.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .common import LM_HEAD_ROWS, LayerNorm32, check_group, group_cache, group_outputs, head_logits
from .llama import rotate_half_matrix

# How the RoPE table is rounded: "fp32" (SwissArmyTransformer 0.4.12: its inv_freq.half() is
# commented out), "fp16_inv_freq" (modeling_chatglm.py's inv_freq.half() with fp32 angles: the HF
# code run in fp32, and SAT run in fp16, whose .half() rounds the buffer), "fp16" (the HF code run
# in fp16: positions, inv_freq, angles and cos/sin all fp16).
ROPE_PRECISIONS = ("fp32", "fp16_inv_freq", "fp16")
MASKED_SCORE = -10000.0


@dataclass(frozen=True)
class ChatGLMConfig:
    vocab_size: int = 130528
    hidden: int = 4096
    layers: int = 28
    heads: int = 32
    ffn: int = 16384
    ln_eps: float = 1e-5
    max_positions: int = 2048  # max_sequence_length: the RoPE table's rows
    rope_base: float = 10000.0
    rope_precision: str = "fp16_inv_freq"

    def __post_init__(self):
        if self.rope_precision not in ROPE_PRECISIONS:
            raise ValueError(f"rope_precision {self.rope_precision!r}: choose one of {ROPE_PRECISIONS}")
        if self.hidden % self.heads or (self.hidden // self.heads) % 4:
            raise ValueError(f"hidden {self.hidden} / heads {self.heads} must give a head_dim divisible by 4")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def rotary_dim(self) -> int:
        """Each half of a head is rotated on its own (position_encoding_2d)."""
        return self.head_dim // 2

    @property
    def alpha(self) -> float:
        return (2 * self.layers) ** 0.5


def rope_table(rotary_dim: int, length: int, base: float, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [length, rotary_dim] (rotate-half layout, ``cat(freqs, freqs)``) as float32 values.
    inv_freq is computed as the original computes it (fp32 pow); cos and sin are evaluated in
    float64 and rounded once, so that the same export gives the same bytes (torch's fp32 kernels
    differ in the last bit between their vectorised and scalar paths)."""
    if precision not in ROPE_PRECISIONS:
        raise ValueError(f"rope precision {precision!r}: choose one of {ROPE_PRECISIONS}")
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    t = torch.arange(length, dtype=torch.float32)
    if precision != "fp32":
        inv_freq = inv_freq.half().float()
    if precision == "fp16":
        # A product of two fp16 values is exact in fp32: one rounding to fp16, as the fp16 kernel.
        t = t.half().float()
        freqs = (t[:, None] * inv_freq[None, :]).half().double()
    else:
        freqs = (t[:, None] * inv_freq[None, :]).double()
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().float(), emb.sin().float()
    if precision == "fp16":
        cos, sin = cos.half().float(), sin.half().float()
    return cos, sin


def rotate_halves_matrix(head_dim: int) -> torch.Tensor:
    """R [D, D] with ``x @ R`` = rotate_half applied to each half of a head separately."""
    r = rotate_half_matrix(head_dim // 2)
    return torch.block_diag(r, r)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """ChatGLM's ``gelu_impl`` in its own operation order (x * (1 + c x^2), not x + c x^3)."""
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


class GLMAttention(nn.Module):
    def __init__(self, cfg: ChatGLMConfig, layer_id: int):
        super().__init__()
        self.cfg, self.coeff = cfg, float(layer_id + 1)  # query_key_layer_scaling_coeff
        self.query_key_value = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x, rope, past_ok, new_ok, past_k, past_v, dims):
        """x [B,S,H]; rope = (cos, sin [B,1,S,D], R [D,D]); past_ok [B,1,1,C] and new_ok [B,1,S,S]
        bool; past [B,heads,C,D]; dims = (B, S, C) from the group's inputs, so that every reshape
        uses the same shape values -> out [B,S,H], new k, v [B,heads,S,D]."""
        b, s, c = dims
        h, d = self.cfg.heads, self.cfg.head_dim
        cos, sin, rot = rope
        # Head-interleaved rows: per head [q | k | v], so one reshape and transpose give each head's
        # q, k and v side by side in the last dim.
        qkv = self.query_key_value(x).reshape(b, s, h, 3 * d).transpose(1, 2)  # [B, heads, S, 3D]
        q, k, v = qkv.split(d, dim=-1)
        q = q * cos + torch.matmul(q, rot) * sin
        k = k * cos + torch.matmul(k, rot) * sin
        q = q / (math.sqrt(d) * self.coeff)
        # Scores against the cache and against the new keys apart: the cache is never concatenated.
        masked = torch.full((), MASKED_SCORE, dtype=q.dtype)
        past = torch.where(past_ok, torch.matmul(q, past_k.transpose(-1, -2)), masked)
        new = torch.where(new_ok, torch.matmul(q, k.transpose(-1, -2)), masked)
        scores = torch.cat([past, new], dim=-1).float() * self.coeff
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        p_past, p_new = probs.split([c, s], dim=-1)
        out = torch.matmul(p_past, past_v) + torch.matmul(p_new, v)
        return self.dense(out.transpose(1, 2).reshape(b, s, h * d)), k, v


class GLMMLP(nn.Module):
    """``GLU`` in the original, but not gated: dense_4h_to_h(gelu_tanh(dense_h_to_4h(x)))."""

    def __init__(self, cfg: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden, cfg.ffn)
        self.dense_4h_to_h = nn.Linear(cfg.ffn, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(gelu_tanh(self.dense_h_to_4h(x)))


class GLMBlock(nn.Module):
    """Post-LN with the residual on the normed input, scaled by alpha::

        a = input_layernorm(x);        h = a * alpha + attention(a)
        m = post_attention_layernorm(h); out = m * alpha + mlp(m)
    """

    def __init__(self, cfg: ChatGLMConfig, layer_id: int):
        super().__init__()
        self.alpha = cfg.alpha
        self.input_layernorm = LayerNorm32(cfg.hidden, eps=cfg.ln_eps)
        self.attention = GLMAttention(cfg, layer_id)
        self.post_attention_layernorm = LayerNorm32(cfg.hidden, eps=cfg.ln_eps)
        self.mlp = GLMMLP(cfg)

    def forward(self, x, rope, past_ok, new_ok, past_k, past_v, dims):
        a = self.input_layernorm(x)
        out, k, v = self.attention(a, rope, past_ok, new_ok, past_k, past_v, dims)
        m = self.post_attention_layernorm(a * self.alpha + out)
        return m * self.alpha + self.mlp(m), k, v


class ChatGLMEmbedding(nn.Module):
    """input_ids [B, S] int64 -> inputs_embeds [B, S, H] (no scaling, no position embedding)."""

    def __init__(self, cfg: ChatGLMConfig = ChatGLMConfig()):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class ChatGLMDecoderGroup(nn.Module):
    """Layers ``[start, stop)``; the group that ends the model adds final_layernorm and lm_head.

    ``kv_layout`` as the Llama groups' (graphs/llama.py): ``stacked`` takes the group's cache as one
    ``past_kv`` [L, 2, B, heads, C, D] and returns one ``present_kv`` (four dynamic dims per ATC
    gear whatever the group's size); ``per_layer`` takes ``past_key_i``, ``past_value_i`` and
    returns ``present_key_i``, ``present_value_i`` (no split of the cache on onnxruntime; two
    dynamic cache dims per layer). Parameter names mirror the HF checkpoint under ``layers.{i - start}``."""

    def __init__(self, cfg: ChatGLMConfig, start: int, stop: int, rope_length: int | None = None,
                 kv_layout: str = "stacked"):
        super().__init__()
        check_group(start, stop, cfg.layers, kv_layout)
        self.cfg, self.start, self.stop, self.kv_layout = cfg, start, stop, kv_layout
        self.layers = nn.ModuleList(GLMBlock(cfg, layer_id) for layer_id in range(start, stop))
        self.is_last = stop == cfg.layers
        if self.is_last:
            self.final_layernorm = LayerNorm32(cfg.hidden, eps=cfg.ln_eps)
            self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.init_buffers(rope_length or cfg.max_positions)

    def init_buffers(self, rope_length: int) -> None:
        """(Re)create the constant tables; a loader that built the group on the meta device calls it."""
        cfg = self.cfg
        cos, sin = rope_table(cfg.rotary_dim, rope_length, cfg.rope_base, cfg.rope_precision)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("rope_rot", rotate_halves_matrix(cfg.head_dim), persistent=False)

    def forward(self, hidden_states, position_ids, attention_mask, *cache, logits_index=None):
        """``cache``: ``past_kv`` (stacked) or ``past_key_0, past_value_0, ...`` (per layer), then
        ``logits_index`` for the last group; without it (the torch reference) the logits of every
        position [B, S, V]."""
        past, logits_index = group_cache(cache, len(self.layers), self.kv_layout, logits_index)
        dtype = hidden_states.dtype
        pos, block = position_ids[:, 0], position_ids[:, 1]  # [B, S] each
        # The first half of each head turns with the position, the second with the block position.
        cos = torch.cat([self.rope_cos[pos], self.rope_cos[block]], dim=-1).unsqueeze(1).to(dtype)
        sin = torch.cat([self.rope_sin[pos], self.rope_sin[block]], dim=-1).unsqueeze(1).to(dtype)
        rope = (cos, sin, self.rope_rot.to(dtype))
        past_ok = (attention_mask > 0.5)[:, None, None, :]
        new_ok = (block[:, None, :] <= block[:, :, None]).unsqueeze(1)  # prefix-LM, see the docstring
        dims = (hidden_states.shape[0], hidden_states.shape[1], attention_mask.shape[1])
        x, present = hidden_states, []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, rope, past_ok, new_ok, past[2 * i], past[2 * i + 1], dims)
            present += [torch.stack([k, v])] if self.kv_layout == "stacked" else [k, v]
        if self.is_last:
            x = head_logits(x, logits_index, self.final_layernorm, self.lm_head, LM_HEAD_ROWS)
        return group_outputs(x, present, self.kv_layout)
