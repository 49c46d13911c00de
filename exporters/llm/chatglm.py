"""The ChatGLM-6B decoder kind (VisualGLM-6B's LLM): graphs/chatglm.py as bundle graphs.

Graphs: ``embed`` input_ids -> inputs_embeds (word embeddings only), and ``decoder_N`` layer
groups taking hidden states, the 2-D positions [B, 2, S] (row 0 positions, row 1 block
positions), the cache's validity mask and the group's cache (stacked, or per layer as
``--kv-layout per_layer`` asks: the Llama kind's two layouts), the last group also ``logits_index``. Attention is ``prefix_lm``: the
context ([..., gMASK, <sop>]) sees itself both ways, so it is prefilled in one chunk.

The graphs take the 2-D positions as an input of role ``positions_2d``; the runtime computes them
from each token's 1-D index and its row's prefix (context) length by the manifest's
``pipeline.positions.kind`` = ``glm_2d`` (docs/bundle.md), so no ChatGLM rule lives in the runtime
under a family name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from vlm2om.graphs.chatglm import ChatGLMConfig, ChatGLMDecoderGroup, ChatGLMEmbedding

from vlm2om.exporters.core.options import Gears
from vlm2om.exporters.core.subgraph import Subgraph, TensorDecl
from vlm2om.exporters.llm.embed import embed_subgraph
from vlm2om.exporters.llm.common import (LlmParts, empty_cache, group_bounds, group_subgraph, kv_decls, kv_feed,
                                         kv_manifest, random_parts)

POSITIONS = {"kind": "glm_2d"}  # runtime/schema.py POSITIONS
# The last group holds one GLM layer beside the 130528-row lm_head (1 GB in fp16): with two, the
# export's verification of that file peaked at 3.2 GiB, with one at 2.8 (the other groups take
# --layers-per-group layers). On the NPU this is one more graph run per token (15 instead of 14
# for the real model's 28 layers in pairs).
LAST_GROUP_LAYERS = 1


def chatglm_bounds(cfg: ChatGLMConfig, gears: Gears) -> list[tuple[int, int]]:
    return group_bounds(cfg.layers, gears.layers_per_group, last=LAST_GROUP_LAYERS)
# ChatGLM-6B's special pieces (tokenization_chatglm.py); the manifest names them, the ids follow the
# tokenizer (the real ice_text.model: [MASK] 130000, [gMASK] 130001, <sop> 130004, <eop> 130005).
SPECIAL_TOKENS = {"bos": "<sop>", "eos": "<eop>", "mask": "[MASK]", "gmask": "[gMASK]", "pad": "<pad>"}


def tokenizer_entry(bos_id: int, eos_id: int, id_offset: int = 0, max_blank: int = 80) -> dict:
    """The manifest's ``tokenizer`` entry for a ChatGLM-6B SentencePiece model (runtime/chatglm_tokenizer.py)."""
    return {"kind": "chatglm_sentencepiece", "file": "ice_text.model", "bos_id": bos_id, "eos_id": eos_id,
            "eos_ids": [eos_id], "id_offset": id_offset, "max_blank": max_blank}


REAL_TOKENIZER = tokenizer_entry(130004, 130005)


def glm_2d_positions(index: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """[B, 2, S] ChatGLM positions of the 1-D indices ``index`` [B, S] of rows whose prompts
    (context through <sop>) have ``prompt`` [B] positions: [gMASK] at ``prompt - 2``. Before
    <sop>: (index, 0); from <sop> on (answer tokens and right padding alike): (prompt - 2,
    index - prompt + 2), so <sop> has block position 1 and the block positions keep counting."""
    p = prompt[:, None]
    after = index >= p - 1
    pos = torch.where(after, p - 2, index)
    block = torch.where(after, index - p + 2, torch.zeros_like(index))
    return torch.stack([pos, block], dim=1)


@dataclass(frozen=True)
class ChatGLMSpec:
    cfg: ChatGLMConfig
    tokenizer: dict = field(default_factory=lambda: dict(REAL_TOKENIZER))  # tokenizer_entry(...)
    kv_layout: str = "stacked"  # graphs/chatglm.py ChatGLMDecoderGroup.kv_layout
    special_tokens = SPECIAL_TOKENS
    attention = "prefix_lm"
    positions = POSITIONS

    @property
    def hidden(self) -> int:
        return self.cfg.hidden

    def embed_subgraph(self, build: Callable[[], nn.Module], seq_gears: list[int], dtype: str) -> Subgraph:
        return embed_subgraph(build, self.cfg.vocab_size, self.cfg.hidden, seq_gears, dtype)

    def group_subgraph(self, index: int, build: Callable[[], nn.Module], bounds: tuple[int, int],
                       seq_gears: list[int], cache_gears: list[int], dtype: str) -> Subgraph:
        """Layers ``bounds`` = [start, stop); ``build`` makes that ChatGLMDecoderGroup."""
        cfg, (start, stop) = self.cfg, bounds
        n, h, d = stop - start, cfg.heads, cfg.head_dim
        tdtype, last = getattr(torch, dtype), stop == cfg.layers

        def make(gear, gen):
            """A row's prompt ends inside the chunk or before it (then the chunk is answer tokens)."""
            b, s, c = gear["batch"], gear["seq"], gear["cache"]
            valid = int(torch.randint(0, c, (), generator=gen))
            mask = torch.zeros(b, c)
            mask[:, :valid] = 1
            prompt = torch.randint(2, max(3, valid + s + 1), (b,), generator=gen)
            index = valid + torch.arange(s).expand(b, s)
            past = torch.randn(n, 2, b, h, c, d, generator=gen).to(tdtype)
            return {
                "hidden_states": torch.randn(b, s, cfg.hidden, generator=gen).to(tdtype),
                "position_ids": glm_2d_positions(index, prompt),
                "attention_mask": mask, **kv_feed(self.kv_layout, start, past),
                **({"logits_index": torch.randint(0, s, (b,), generator=gen)} if last else {}),
            }

        past, presents = kv_decls(self.kv_layout, start, n, h, d, dtype)
        inputs = [TensorDecl("hidden_states", dtype, ("batch", "seq", cfg.hidden), "hidden"),
                  TensorDecl("position_ids", "int64", ("batch", 2, "seq"), "positions_2d"),
                  TensorDecl("attention_mask", "float32", ("batch", "cache"), "valid_mask"), *past]
        return group_subgraph(index, build, inputs, presents, make, seq_gears, cache_gears, bounds, cfg.hidden,
                              cfg.vocab_size, last, dtype)

    def kv_manifest(self, bounds: list[tuple[int, int]], cache_gears: list[int], dtype: str) -> dict:
        """The manifest's ``kv_cache`` entry (see docs/bundle.md): keys after RoPE."""
        cfg = self.cfg
        return kv_manifest(self.kv_layout, cfg.layers, cfg.heads, cfg.head_dim, bounds, cache_gears, dtype)

    @staticmethod
    @torch.no_grad()
    def reference_forward(group, x: torch.Tensor, prompt: int | None = None) -> torch.Tensor:
        """A decoder group over a whole sequence [1, T, H] with an empty cache: the first
        ``prompt`` positions are the context through <sop> (default: all of ``x``), the rest
        answer tokens. Unlike the causal kinds, ChatGLM's numbers depend on where the context ends."""
        t = x.shape[1]
        index = torch.arange(t)[None]
        positions = glm_2d_positions(index, torch.tensor([t if prompt is None else prompt]))
        return group(x, positions, torch.zeros(1, 0), *empty_cache(group, group.cfg.heads, x.dtype))[0]


def random_llm(cfg: ChatGLMConfig, gears: Gears, seed: int, dtype: str, tokenizer: dict) -> LlmParts:
    """Seeded random weights: the embedding from ``seed + 4``, group [a, b) from ``seed + 10 + a``
    (the Llama kind's seeds). The RoPE table covers ``gears.rope_length`` positions at least;
    ``tokenizer`` is the manifest entry (``tokenizer_entry``)."""
    rope = max(gears.rope_length, cfg.max_positions)
    return random_parts(ChatGLMSpec(cfg, tokenizer, gears.kv_layout), chatglm_bounds(cfg, gears),
                        lambda a, b: ChatGLMDecoderGroup(cfg, a, b, rope, gears.kv_layout),
                        lambda: ChatGLMEmbedding(cfg), seed, dtype)
