"""InternLM2 decoder with Partial LoRA (InternLM-XComposer2's LLM), with the explicit KV-cache
contract of graphs/llama.py plus the image mask that switches PLoRA on.

Reference: the HF remote code ``modeling_internlm2.py`` of internlm-xcomposer2-vl-7b / -4khd-7b
(and ``build_mlp.py PLoRA``): pre-norm layers ``h += attention(attention_norm(h), im_mask)``,
``h += feed_forward(ffn_norm(h), im_mask)``, RMSNorm with fp32 variance, a grouped ``wqkv`` whose
rows are ``[q x (heads/kv_heads) | k | v]`` per KV group, rotate-half RoPE with ``rope_theta``, a
SiLU-gated MLP ``w2(silu(w1 x) * w3 x)``, and every one of wqkv, wo, w1, w2, w3 a PLoRA linear::

    res = x @ W^T (+ b);   res[im_mask] += Plora_B(Plora_A(x[im_mask])) * (lora_alpha / lora_r)

One group's graph::

    hidden_states  [B, S, H]        inputs_embeds for group 0, the previous group's output after
    position_ids   [B, S]    int64  absolute positions of the S new tokens
    attention_mask [B, C]    float  1 where a cache slot holds a valid past token, else 0
    im_mask        [B, S]    float  1 on image positions (PLoRA on), else 0 (role image_mask)
    past_kv        [L, 2, B, KVH, C, D]   keys (after RoPE) and values of the cache slots
                   (or, kv_layout per_layer: past_key_i, past_value_i [B, KVH, C, D] per layer)
 (last group) logits_index [B] int64  the one new position per row whose logits are wanted
 -> hidden_states [B, S, H] | logits [B, V] float32 (last group)
    present_kv     [L, 2, B, KVH, S, D]   keys and values of the S new tokens only
                   (per_layer: present_key_i, present_value_i [B, KVH, S, D])

PLoRA is computed for every row and kept only where the mask is set, ``where(m, res + B(A(x)) *
alpha/r, res)``: static shapes, no boolean indexing, and the same numbers as the original's
indexed add in any dtype (its non-image rows never see the LoRA branch, not even as 0 * inf).
The original zeroes ``im_mask`` whenever it embeds token ids itself, i.e. on every decode step:
the runtime feeds zeros there.

The packed ``wqkv`` stays in the checkpoint's group layout (no row permutation in the graph, which
no weight fold would remove): its output is viewed as [B, S, KVH, q_per_kv + 2, D] and transposed
once; queries then come out grouped by KV head, which is how grouped-query attention is folded into
the query rows here (no repeat of the cache). RoPE turns q and k together by a Gather of the
position tables and one rotate-half MatMul, the causal mask is a compare of positions (right
padding keeps counting), and there is no Range/Trilu/If/Loop.

fp16 order kept from the original: scores are divided by sqrt(D) in the activation dtype (the
scale is not folded into the weights), the softmax runs in fp32 over ``finfo.min``-masked scores,
RMSNorm's variance is fp32, and the logits are cast to fp32 at the end.

RoPE scaling: ``linear`` divides the positions by the factor (static, exact at any length).
``dynamic`` (NTK) recomputes the whole table from the current total length once that exceeds
``max_positions``, and keeps the grown table afterwards, so its numbers past ``max_positions``
depend on the history of the process (and the cached keys were turned by older tables); below it
the table is the plain one. A group with dynamic scaling is therefore built only for
``rope_length <= max_positions``, where the static table is exact, and refused beyond.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .common import LM_HEAD_ROWS, causal_biases, check_group, group_cache, group_outputs, head_logits
from .llama import RMSNorm, rotate_half_matrix

LORA_KINDS = ("wqkv", "wo", "w1", "w2", "w3")
ROPE_SCALINGS = (None, "linear", "dynamic")


def lora_table(default: tuple[int, float] = (256, 256), **per_kind: tuple[int, float]) -> tuple:
    """The config's ``lora`` field: ((kind, r, alpha), ...) for every kind, ``default`` where a kind
    is not named: ``lora_table(wqkv=(8, 16))``."""
    unknown = set(per_kind) - set(LORA_KINDS)
    if unknown:
        raise ValueError(f"PLoRA kinds {sorted(unknown)}: choose from {LORA_KINDS}")
    return tuple((k, *per_kind.get(k, default)) for k in LORA_KINDS)


@dataclass(frozen=True)
class InternLM2Config:
    vocab_size: int = 92544
    hidden: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 8
    ffn: int = 14336
    rms_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    max_positions: int = 32768
    rope_scaling: str | None = None  # None | "linear" | "dynamic" (config.json rope_scaling.type)
    rope_factor: float = 1.0  # rope_scaling.factor
    bias: bool = False  # config.bias: wqkv and wo only (the MLP never has one)
    lora: tuple = lora_table()  # ((kind, r, alpha), ...) for wqkv, wo, w1, w2, w3

    def __post_init__(self):
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden {self.hidden}, heads {self.heads}, kv_heads {self.kv_heads}: "
                             "heads must divide hidden and kv_heads must divide heads")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"rope_scaling {self.rope_scaling!r}: choose one of {ROPE_SCALINGS}")
        if self.rope_scaling is not None and self.rope_factor < 1.0:
            raise ValueError(f"rope_factor {self.rope_factor} must be >= 1 (as the original checks)")
        if tuple(k for k, *_ in self.lora) != LORA_KINDS or any(r < 1 for _, r, _ in self.lora):
            raise ValueError(f"lora {self.lora!r}: one (kind, r >= 1, alpha) for each of {LORA_KINDS}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def q_per_kv(self) -> int:
        return self.heads // self.kv_heads

    def lora_of(self, kind: str) -> tuple[int, float]:
        """(lora_r, lora_alpha) of one projection kind."""
        for k, r, alpha in self.lora:
            if k == kind:
                return r, alpha
        raise KeyError(kind)


def rope_table(cfg: InternLM2Config, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [length, head_dim], rotate-half layout, computed as graphs/llama.py does (fp32
    inverse frequencies and angles, cos/sin in float64 rounded once); ``linear`` scaling divides
    the fp32 positions by the factor as the original does. See the module docstring for dynamic."""
    if cfg.rope_scaling == "dynamic" and length > cfg.max_positions:
        raise ValueError(f"dynamic NTK RoPE: a static table is exact only for positions below "
                         f"max_positions {cfg.max_positions}, not {length}")
    d = cfg.head_dim
    exponent = torch.arange(0, d, 2, dtype=torch.int64).float() / d
    inv_freq = (1.0 / (cfg.rope_theta ** exponent.double())).float()
    t = torch.arange(length, dtype=torch.float32)
    if cfg.rope_scaling == "linear":
        t = t / cfg.rope_factor
    emb = torch.cat([torch.outer(t, inv_freq)] * 2, dim=-1).double()
    return emb.cos().float(), emb.sin().float()


class PLoRA(nn.Module):
    """A linear layer with a partial LoRA branch applied on the rows where ``on`` is True.

    Parameter names as in the checkpoint: ``weight`` (``bias``), ``Plora_A.weight`` [r, in],
    ``Plora_B.weight`` [out, r]."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.Plora_A = nn.Linear(in_features, r, bias=False)
        self.Plora_B = nn.Linear(r, out_features, bias=False)
        self.scaling = alpha / r
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        """x [B, S, in]; on [B, S, 1] bool."""
        res = F.linear(x, self.weight, self.bias)
        lora = self.Plora_B(self.Plora_A(x))
        if self.scaling != 1.0:
            lora = lora * self.scaling
        return torch.where(on, res + lora, res)


class InternLM2Attention(nn.Module):
    def __init__(self, cfg: InternLM2Config):
        super().__init__()
        self.cfg = cfg
        d, g = cfg.head_dim, cfg.kv_heads
        self.wqkv = PLoRA(cfg.hidden, (cfg.heads + 2 * g) * d, *cfg.lora_of("wqkv"), bias=cfg.bias)
        self.wo = PLoRA(cfg.heads * d, cfg.hidden, *cfg.lora_of("wo"), bias=cfg.bias)

    def forward(self, x, on, rope, bias_past, bias_new, past_k, past_v, dims):
        """x [B,S,H]; on [B,S,1] bool; rope = (cos, sin [B,1,1,S,D], R [D,D]); bias_past
        [B,1,1,C]; bias_new [B,1,S,S]; past [B,KVH,C,D]; dims = (B, S, C)
        -> out [B,S,H], new k, v [B,KVH,S,D]."""
        cfg = self.cfg
        b, s, c = dims
        h, g, p, d = cfg.heads, cfg.kv_heads, cfg.q_per_kv, cfg.head_dim
        cos, sin, rot = rope
        # The checkpoint's rows per KV group: [q x p | k | v] -> [B, g, p + 2, S, D].
        qkv = self.wqkv(x, on).reshape(b, s, g, p + 2, d).permute(0, 2, 3, 1, 4)
        qk, v = qkv.split([p + 1, 1], dim=2)
        qk = qk * cos + torch.matmul(qk, rot) * sin  # RoPE on q and k together
        q, k = qk.split([p, 1], dim=2)
        k, v = k.reshape(b, g, s, d), v.reshape(b, g, s, d)
        # Query heads grouped by their KV head become rows: head g_i * p + j (the original's order).
        qg = q.reshape(b, g, p * s, d)
        scale = d ** 0.5
        past = (torch.matmul(qg, past_k.transpose(-1, -2)) / scale).reshape(b, h, s, c)
        new = (torch.matmul(qg, k.transpose(-1, -2)) / scale).reshape(b, h, s, s)
        probs = torch.softmax(torch.cat([past.float() + bias_past, new.float() + bias_new], dim=-1), dim=-1)
        p_past, p_new = probs.to(v.dtype).split([c, s], dim=-1)
        out = torch.matmul(p_past.reshape(b, g, p * s, c), past_v) + torch.matmul(p_new.reshape(b, g, p * s, s), v)
        out = out.reshape(b, h, s, d).transpose(1, 2).reshape(b, s, h * d)
        return self.wo(out, on), k, v


class InternLM2MLP(nn.Module):
    def __init__(self, cfg: InternLM2Config):
        super().__init__()
        self.w1 = PLoRA(cfg.hidden, cfg.ffn, *cfg.lora_of("w1"))
        self.w3 = PLoRA(cfg.hidden, cfg.ffn, *cfg.lora_of("w3"))
        self.w2 = PLoRA(cfg.ffn, cfg.hidden, *cfg.lora_of("w2"))

    def forward(self, x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x, on)) * self.w3(x, on), on)


class InternLM2Layer(nn.Module):
    def __init__(self, cfg: InternLM2Config):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.attention = InternLM2Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.feed_forward = InternLM2MLP(cfg)

    def forward(self, x, on, rope, bias_past, bias_new, past_k, past_v, dims):
        a, k, v = self.attention(self.attention_norm(x), on, rope, bias_past, bias_new, past_k, past_v, dims)
        x = x + a
        return x + self.feed_forward(self.ffn_norm(x), on), k, v


class InternLM2Embedding(nn.Module):
    """input_ids [B, S] int64 -> inputs_embeds [B, S, H] (``tok_embeddings.weight``)."""

    def __init__(self, cfg: InternLM2Config = InternLM2Config()):
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(input_ids)


class InternLM2DecoderGroup(nn.Module):
    """Layers ``[start, stop)`` as ``layers.{i - start}``; the group that ends the model adds
    ``norm`` and ``output`` (the lm_head). ``kv_layout`` as in graphs/llama.py
    ``LlamaDecoderGroup``; ``rope_length`` rows of RoPE table (default ``max_positions``)."""

    def __init__(self, cfg: InternLM2Config, start: int, stop: int, rope_length: int | None = None,
                 kv_layout: str = "stacked"):
        super().__init__()
        check_group(start, stop, cfg.layers, kv_layout)
        self.cfg, self.start, self.stop, self.kv_layout = cfg, start, stop, kv_layout
        self.layers = nn.ModuleList(InternLM2Layer(cfg) for _ in range(stop - start))
        self.is_last = stop == cfg.layers
        if self.is_last:
            self.norm = RMSNorm(cfg.hidden, cfg.rms_eps)
            self.output = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.init_buffers(rope_length or cfg.max_positions)

    def init_buffers(self, rope_length: int) -> None:
        """(Re)create the constant tables; a loader that built the group on the meta device calls it."""
        cos, sin = rope_table(self.cfg, rope_length)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("rope_rot", rotate_half_matrix(self.cfg.head_dim), persistent=False)

    def forward(self, hidden_states, position_ids, attention_mask, im_mask, *cache, logits_index=None):
        """``cache``: ``past_kv`` (stacked) or ``past_key_0, past_value_0, ...`` (per layer), then
        ``logits_index`` for the last group; without it (the torch reference) the logits of every
        position [B, S, V]."""
        past, logits_index = group_cache(cache, len(self.layers), self.kv_layout, logits_index)
        dtype = hidden_states.dtype
        cos = self.rope_cos[position_ids][:, None, None].to(dtype)  # [B, 1, 1, S, D]
        sin = self.rope_sin[position_ids][:, None, None].to(dtype)
        bias_past, bias_new = causal_biases(position_ids, attention_mask)
        on = (im_mask > 0.5).unsqueeze(-1)  # [B, S, 1]
        rope = (cos, sin, self.rope_rot.to(dtype))
        dims = (hidden_states.shape[0], hidden_states.shape[1], attention_mask.shape[1])
        x, present = hidden_states, []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, on, rope, bias_past, bias_new, past[2 * i], past[2 * i + 1], dims)
            present += [torch.stack([k, v])] if self.kv_layout == "stacked" else [k, v]
        if self.is_last:
            x = head_logits(x, logits_index, self.norm, self.output, LM_HEAD_ROWS)
        return group_outputs(x, present, self.kv_layout)


class CountedPositions(nn.Module):
    """A group whose graph takes no ``position_ids``: each new token's position is the number of
    valid cache slots of its row plus its offset in the chunk. That is what the original computes
    (its RoPE ignores ``position_ids`` and turns the tokens by their index in the key/value
    sequence), and it keeps the graph at four dynamic dims per ATC gear with ``im_mask`` (seq in
    hidden_states and im_mask, cache in attention_mask and the cache), the most CANN 5 and 6 take.
    The runtime's cache holds each row's tokens in its first valid slots, so the count is the
    position it would feed."""

    def __init__(self, group: InternLM2DecoderGroup, max_seq: int):
        super().__init__()
        self.group = group
        self.register_buffer("offsets", torch.arange(max_seq, dtype=torch.int64), persistent=False)

    def forward(self, hidden_states, attention_mask, im_mask, *cache):
        held = attention_mask.sum(dim=1, keepdim=True).to(torch.int64)  # [B, 1]: exact below 2^24 slots
        positions = held + self.offsets[:hidden_states.shape[1]]
        return self.group(hidden_states, positions, attention_mask, im_mask, *cache)
