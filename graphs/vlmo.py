"""VLMo (microsoft/unilm ``vlmo/``): the multiway transformer as static encoder graphs, no KV cache.

One transformer serves three graphs, by the modality its blocks run in:

* ``vl`` (VQA): ``[CLS] q [SEP] [PAD]..`` text of exactly ``max_text_len`` tokens, then the image's
  CLS and patches, through every block; below ``vlffn_start`` a block's FFN is split at the text
  length (the text expert on the text rows, the image expert on the image rows), from it on the
  VL expert runs on all rows; then the final norm, the pooler on the text CLS and the VQA head;
* ``text`` / ``image`` (retrieval): one modality through all blocks with its own expert, the
  final norm, the ITC projection of the CLS row, L2-normalised.

Attention is shared by the modalities: ``qkv`` without bias plus ``q_bias``/``v_bias`` (k gets
none), logits in float32 whatever the graph's dtype, one relative position bias per layer, the
padding masked. The bias comes from VLMo's ONE table [all distances, heads x layers]: layer i
uses its columns i*heads .. (i+1)*heads. Which entry each (query, key) pair takes is a constant
index (BEiT's 2-D index on the image, a 1-D one on the text, two constants across them, three
for the CLS rows and columns): the graph keeps the table (the checkpoint's weights) and the index,
and gathers, instead of the 510 MB the precomputed float32 bias of twelve layers would take.

Names are the original's (``transformer.blocks.N.*``, ``text_embeddings.*``, ``pooler.dense``,
``vqa_classifier``, ``itc_{text,image}_proj.fc``) so a checkpoint maps by the identity.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

MODALITIES = ("vl", "text", "image")


@dataclass(frozen=True)
class VlmoConfig:
    image_size: int = 480
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    vlffn_start: int = 10  # vlffn_start_layer_index: blocks from here on have the VL expert
    max_text_len: int = 40
    text_rel_len: int = 196  # max_text_len_of_initckpt: sizes the table's text part
    vocab_size: int = 30522
    layer_scale: float = 0.1  # layer_scale_init_values; 0: no gammas (base_plus)
    eps: float = 1e-6  # the blocks' and final LayerNorms
    bert_eps: float = 1e-12  # the text embeddings' LayerNorm
    vqa_labels: int = 3129

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def image_tokens(self) -> int:
        return self.grid * self.grid + 1

    @property
    def num_relative_distance(self) -> int:
        """The image part of the table: (2g - 1)^2 2-D distances, then the three CLS entries."""
        return (2 * self.grid - 1) ** 2 + 3

    @property
    def table_rows(self) -> int:
        """Image part, the text part (2 x text_rel_len), then text->image and image->text."""
        return self.num_relative_distance + 2 * self.text_rel_len + 2


def image_index(cfg: VlmoConfig) -> torch.Tensor:
    """[N+1, N+1] (BEiT's): patch pairs by their 2-D offset; row 0 (CLS as query) num_rel - 3,
    column 0 num_rel - 2, the CLS pair num_rel - 1."""
    g, n = cfg.grid, cfg.num_relative_distance
    ys, xs = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + g - 1
    dx = xs[:, None] - xs[None, :] + g - 1
    out = torch.empty(g * g + 1, g * g + 1, dtype=torch.int64)
    out[1:, 1:] = dy * (2 * g - 1) + dx
    out[0, :], out[:, 0], out[0, 0] = n - 3, n - 2, n - 1
    return out


def text_index(cfg: VlmoConfig) -> torch.Tensor:
    """[T, T]: tokens i, j >= 1 by j - i, offset into the text part; CLS as for the image, from
    the end of the table."""
    t, rows = cfg.max_text_len, cfg.table_rows
    pos = torch.arange(t - 1)
    out = torch.empty(t, t, dtype=torch.int64)
    out[1:, 1:] = (pos[None, :] - pos[:, None]) + (cfg.text_rel_len - 2) + cfg.num_relative_distance + 2
    out[0, :], out[:, 0], out[0, 0] = rows - 3, rows - 2, rows - 1
    return out


def relative_index(cfg: VlmoConfig, modality: str) -> torch.Tensor:
    """The table rows each (query, key) pair of a modality's sequence takes (``vl``: text first)."""
    if modality == "image":
        return image_index(cfg)
    if modality == "text":
        return text_index(cfg)
    t, i = cfg.max_text_len, cfg.image_tokens
    n = cfg.num_relative_distance
    top = torch.cat([text_index(cfg), torch.full((t, i), n, dtype=torch.int64)], dim=1)
    bottom = torch.cat([torch.full((i, t), n + 1, dtype=torch.int64), image_index(cfg)], dim=1)
    return torch.cat([top, bottom])


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, cfg: VlmoConfig):
        super().__init__()
        self.heads, self.scale = cfg.heads, (cfg.width // cfg.heads) ** -0.5
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(cfg.width))
        self.v_bias = nn.Parameter(torch.zeros(cfg.width))
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x, bias: torch.Tensor, mask_bias: torch.Tensor | None):
        """``bias`` [heads, N, N] float32; ``mask_bias`` [B, 1, 1, N] float32 (0 or float32 min)."""
        b, n, c = x.shape
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, qkv_bias).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale).float() @ k.float().transpose(-2, -1) + bias
        if mask_bias is not None:
            attn = attn + mask_bias
        out = attn.softmax(dim=-1).to(x.dtype) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, cfg: VlmoConfig, with_vl: bool):
        super().__init__()
        w, hidden = cfg.width, cfg.width * cfg.mlp_ratio
        self.text_len = cfg.max_text_len
        self.norm1 = nn.LayerNorm(w, eps=cfg.eps)
        self.attn = Attention(cfg)
        self.norm2_text, self.mlp_text = nn.LayerNorm(w, eps=cfg.eps), Mlp(w, hidden)
        self.norm2_imag, self.mlp_imag = nn.LayerNorm(w, eps=cfg.eps), Mlp(w, hidden)
        if with_vl:
            self.norm2_vl, self.mlp_vl = nn.LayerNorm(w, eps=cfg.eps), Mlp(w, hidden)
        self.with_vl = with_vl
        scale = cfg.layer_scale
        self.gamma_1 = nn.Parameter(torch.full((w,), scale)) if scale > 0 else None
        self.gamma_2 = nn.Parameter(torch.full((w,), scale)) if scale > 0 else None

    def _g(self, gamma, y):
        return y if gamma is None else gamma * y

    def forward(self, x, modality: str, bias: torch.Tensor, mask_bias: torch.Tensor | None):
        x = x + self._g(self.gamma_1, self.attn(self.norm1(x), bias, mask_bias))
        if modality == "image":
            return x + self._g(self.gamma_2, self.mlp_imag(self.norm2_imag(x)))
        if modality == "text":
            return x + self._g(self.gamma_2, self.mlp_text(self.norm2_text(x)))
        if self.with_vl:
            return x + self._g(self.gamma_2, self.mlp_vl(self.norm2_vl(x)))
        t, i = x[:, :self.text_len], x[:, self.text_len:]
        t = t + self._g(self.gamma_2, self.mlp_text(self.norm2_text(t)))
        i = i + self._g(self.gamma_2, self.mlp_imag(self.norm2_imag(i)))
        return torch.cat([t, i], dim=1)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VlmoConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size)


class MultiwayTransformer(nn.Module):
    """``transformer.*``: patch embedding and CLS, the blocks, the final norm."""

    def __init__(self, cfg: VlmoConfig):
        super().__init__()
        self.cfg = cfg
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i >= cfg.vlffn_start) for i in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def visual_embed(self, pixels):
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)


class TextEmbeddings(nn.Module):
    """``text_embeddings.*``: BERT's embeddings with ``position_embedding_type='rel_pos'``, so the
    position table exists but is not added: LayerNorm(word + token_type[0])."""

    def __init__(self, cfg: VlmoConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embeddings = nn.Embedding(cfg.max_text_len, cfg.width)  # in the checkpoint, unused
        self.token_type_embeddings = nn.Embedding(2, cfg.width)
        self.LayerNorm = nn.LayerNorm(cfg.width, eps=cfg.bert_eps)

    def forward(self, ids):
        return self.LayerNorm(self.word_embeddings(ids) + self.token_type_embeddings.weight[0])


class Pooler(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.dense = nn.Linear(width, width)

    def forward(self, x):
        return torch.tanh(self.dense(x[:, 0]))


class ItcHead(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width, bias=False)


class VlmoEncoder(nn.Module):
    """One of VLMo's graphs (``modality``: ``vl`` for VQA, ``text`` or ``image`` for retrieval),
    parameters named as the checkpoint names them.

    vl:    pixel_values [B,3,S,S], text_ids [B,T] int64, text_mask [B,T] -> vqa_logits [B, labels]
    text:  text_ids, text_mask -> text_embeds [B, width] (ITC, L2-normalised)
    image: pixel_values -> image_embeds [B, width] (ITC, L2-normalised)
    """

    def __init__(self, cfg: VlmoConfig, modality: str):
        super().__init__()
        if modality not in MODALITIES:
            raise ValueError(f"modality {modality!r} is not one of {MODALITIES}")
        self.cfg, self.modality = cfg, modality
        self.transformer = MultiwayTransformer(cfg)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(cfg.table_rows, cfg.heads * cfg.layers))
        self.register_buffer("relative_position_index", relative_index(cfg, modality), persistent=False)
        self.token_type_embeddings = nn.Embedding(2, cfg.width)
        if modality != "image":
            self.text_embeddings = TextEmbeddings(cfg)
        if modality == "vl":
            w = cfg.width
            self.pooler = Pooler(w)
            self.vqa_classifier = nn.Sequential(nn.Linear(w, 2 * w), nn.LayerNorm(2 * w), nn.GELU(),
                                                nn.Linear(2 * w, cfg.vqa_labels))
        else:
            setattr(self, f"itc_{modality}_proj", ItcHead(cfg.width))
        if modality == "text":  # the image tower is never run on text: keep only what it uses
            self.transformer.patch_embed, self.transformer.cls_token = None, None

    def _text(self, ids):
        return self.text_embeddings(ids) + self.token_type_embeddings.weight[0]

    def _image(self, pixels):
        return self.transformer.visual_embed(pixels) + self.token_type_embeddings.weight[1]

    def forward(self, *inputs):
        cfg, m = self.cfg, self.modality
        if m == "image":
            x, mask = self._image(inputs[0]), None
        elif m == "text":
            x, mask = self._text(inputs[0]), inputs[1]
        else:
            pixels, ids, text_mask = inputs
            x, mask = torch.cat([self._text(ids), self._image(pixels)], dim=1), text_mask
        mask_bias = None
        if mask is not None:  # the image rows are never masked: only the text's padding is
            keep = mask.float()
            if m == "vl":
                keep = torch.cat([keep, torch.ones(keep.shape[0], cfg.image_tokens, dtype=keep.dtype)], dim=1)
            mask_bias = ((1.0 - keep) * torch.finfo(torch.float32).min)[:, None, None, :]
        table = self.relative_position_bias_table.float()
        for i, blk in enumerate(self.transformer.blocks):
            # This layer's columns gathered alone: [N, N, heads] (42 MB at 941 rows, not 510 for all)
            bias = F.embedding(self.relative_position_index, table[:, i * cfg.heads:(i + 1) * cfg.heads])
            x = blk(x, m, bias.permute(2, 0, 1), mask_bias)
        x = self.transformer.norm(x)
        if m == "vl":
            return self.vqa_classifier(self.pooler(x))
        out = getattr(self, f"itc_{m}_proj").fc(x[:, 0])
        return out / out.norm(dim=-1, keepdim=True)
