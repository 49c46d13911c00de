"""CLIP ViT vision tower as LLaVA-1.5 uses it (openai/clip-vit-large-patch14-336).

LLaVA runs ``CLIPVisionModel`` with ``output_hidden_states=True`` and takes
``hidden_states[mm_vision_select_layer=-2]`` minus the CLS token. In transformers' CLIP,
``hidden_states[0]`` is the embedding output after ``pre_layrnorm`` and ``hidden_states[i]``
the output of encoder layer i-1, so index -2 of a 24-layer tower is the output of layer 22
(0-based): layers 0..22 run, the last layer and ``post_layernorm`` never affect the result.

This module therefore builds only the layers that are used (``cfg.built_layers``, 23 at real
size): the exported graph carries no dead weights, and a loader maps
``encoder.layers.{L-1}.*`` and ``post_layernorm.*`` to "ignored" (``unused_checkpoint_keys``).
Parameter names are the checkpoint's ``vision_model.*`` keys (OpenAI CLIP in transformers
layout, as transformers 4.x's ``CLIPVisionModel`` names them) without that prefix, which is
also transformers 5.x's ``CLIPVisionModel`` state dict as is: ``embeddings.patch_embedding``,
``embeddings.class_embedding``, ``embeddings.position_embedding``, ``pre_layrnorm`` [sic],
``encoder.layers.{i}.self_attn.{q,k,v,out}_proj``, ``layer_norm1/2``, ``mlp.fc1/fc2``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .common import LayerNorm32, attention, merge_heads, split_heads


@dataclass(frozen=True)
class ClipVisionConfig:
    """Defaults: CLIP ViT-L/14 at 336 px with LLaVA-1.5's feature selection."""

    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    layers: int = 24  # in the checkpoint; see built_layers for how many are constructed
    heads: int = 16
    mlp_dim: int = 4096
    act: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu" (exact)
    eps: float = 1e-5
    select_layer: int = -2  # index into transformers' hidden_states (0 = embeddings after pre-LN)
    keep_cls: bool = False  # LLaVA's select_feature "patch" drops CLS; "cls_patch" keeps it

    def __post_init__(self):
        if self.act not in ("quick_gelu", "gelu"):
            raise ValueError(f"unknown CLIP activation '{self.act}'")
        if not 0 <= self.built_layers <= self.layers:
            raise ValueError(f"select_layer {self.select_layer} is outside 0..{self.layers} "
                             f"(or -{self.layers + 1}..-1)")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + 1

    @property
    def num_tokens(self) -> int:
        """Tokens the tower returns: 576 at real size, 577 with CLS kept."""
        return self.num_patches + int(self.keep_cls)

    @property
    def built_layers(self) -> int:
        """Encoder layers run to reach hidden_states[select_layer] (23 for -2 of 24)."""
        n = self.layers + 1
        return self.select_layer % n if -n <= self.select_layer < n else -1

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): OpenAI CLIP's activation (Mul + Sigmoid in ONNX)."""
    return x * torch.sigmoid(1.702 * x)


class ClipEmbeddings(nn.Module):
    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [B, N, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        # The weight itself, not an Embedding lookup: a constant add instead of a Gather.
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight.to(x.dtype)


class ClipAttention(nn.Module):
    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.scale = cfg.head_dim ** -0.5
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(p(x), self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(merge_heads(attention(q, k, v, self.scale)))


class ClipMlp(nn.Module):
    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.act = quick_gelu if cfg.act == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x)), then + mlp(ln2(x)). LayerNorms compute in fp32 in an fp16
    graph, as torch's fp16 LayerNorm on a GPU does internally (and ATC must keep them fp32)."""

    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.layer_norm1 = LayerNorm32(cfg.width, eps=cfg.eps)
        self.self_attn = ClipAttention(cfg)
        self.layer_norm2 = LayerNorm32(cfg.width, eps=cfg.eps)
        self.mlp = ClipMlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Module):
    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(ClipEncoderLayer(cfg) for _ in range(cfg.built_layers))


class ClipVisionTower(nn.Module):
    """pixel_values [B, 3, S, S] -> hidden_states[select_layer] [B, (S/P)^2 (+1 with CLS), width].

    At real size: [1, 3, 336, 336] -> [1, 576, 1024].
    """

    def __init__(self, cfg: ClipVisionConfig = ClipVisionConfig()):
        super().__init__()
        self.cfg = cfg
        self.embeddings = ClipEmbeddings(cfg)
        self.pre_layrnorm = LayerNorm32(cfg.width, eps=cfg.eps)  # transformers' spelling
        self.encoder = ClipEncoder(cfg)

    @staticmethod
    def unused_checkpoint_keys(cfg: ClipVisionConfig) -> tuple[str, ...]:
        """Key prefixes of a full CLIPVisionModel (without ``vision_model.``) this tower ignores."""
        dropped = tuple(f"encoder.layers.{i}." for i in range(cfg.built_layers, cfg.layers))
        return ("post_layernorm.", *dropped)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers:
            x = layer(x)
        return x if self.cfg.keep_cls else x[:, 1:]
