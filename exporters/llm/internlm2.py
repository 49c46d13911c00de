"""The InternLM2 decoder kind (InternLM-XComposer2's LLM): graphs/internlm2.py as bundle graphs.

Graphs: ``embed`` input_ids -> inputs_embeds, and ``decoder_N`` layer groups taking what the Llama
kind's take (hidden states, 1-D positions, the cache's validity mask, the group's cache, the last
group also ``logits_index``) plus ``im_mask`` [B, S] of role ``image_mask``: 1 on the prompt's
image positions, where Partial LoRA applies, 0 elsewhere and in every decode step, as the original
computes it (the runtime fills it from each prompt's layout). Attention is causal.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from vlm2om.graphs.common import cast_module, init_random_
from vlm2om.graphs.internlm2 import InternLM2Config, InternLM2DecoderGroup, InternLM2Embedding

from vlm2om.exporters.core.options import Gears
from vlm2om.exporters.core.subgraph import Subgraph, TensorDecl
from vlm2om.exporters.llm.common import LlmParts, group_bounds, group_subgraph, kv_decls, kv_feed, kv_manifest
from vlm2om.exporters.llm.embed import embed_subgraph

# InternLM2's SentencePiece: <s> 1, </s> 2; the chat also stops at [UNUSED_TOKEN_145] (92542).
TOKENIZER = {"kind": "sentencepiece", "file": "tokenizer.model", "bos_id": 1, "eos_id": 2, "eos_ids": [2, 92542]}


@dataclass(frozen=True)
class InternLM2Spec:
    cfg: InternLM2Config
    tokenizer: dict = field(default_factory=lambda: dict(TOKENIZER))
    kv_layout: str = "stacked"
    special_tokens = {"bos": "<s>", "eos": "</s>", "unk": "<unk>"}
    attention = "causal"

    @property
    def hidden(self) -> int:
        return self.cfg.hidden

    def embed_subgraph(self, build: Callable[[], nn.Module], seq_gears: list[int], dtype: str) -> Subgraph:
        return embed_subgraph(build, self.cfg.vocab_size, self.cfg.hidden, seq_gears, dtype)

    def group_subgraph(self, index: int, build: Callable[[], nn.Module], bounds: tuple[int, int],
                       seq_gears: list[int], cache_gears: list[int], dtype: str) -> Subgraph:
        """Layers ``bounds`` = [start, stop); ``build`` makes that InternLM2DecoderGroup."""
        cfg, (start, stop) = self.cfg, bounds
        n, kvh, d = stop - start, cfg.kv_heads, cfg.head_dim
        tdtype, last = getattr(torch, dtype), stop == cfg.layers

        def make(gear, gen):
            """Image positions on about half of the new tokens, so PLoRA runs in the verification."""
            b, s, c = gear["batch"], gear["seq"], gear["cache"]
            valid = int(torch.randint(1, c, (), generator=gen))
            mask = torch.zeros(b, c)
            mask[:, :valid] = 1
            past = torch.randn(n, 2, b, kvh, c, d, generator=gen).to(tdtype)
            return {
                "hidden_states": torch.randn(b, s, cfg.hidden, generator=gen).to(tdtype),
                "position_ids": (valid + torch.arange(s)).expand(b, s).contiguous(),
                "attention_mask": mask, "im_mask": (torch.rand(b, s, generator=gen) > 0.5).float(),
                **kv_feed(self.kv_layout, start, past),
                **({"logits_index": torch.randint(0, s, (b,), generator=gen)} if last else {}),
            }

        past, presents = kv_decls(self.kv_layout, start, n, kvh, d, dtype)
        inputs = [TensorDecl("hidden_states", dtype, ("batch", "seq", cfg.hidden), "hidden"),
                  TensorDecl("position_ids", "int64", ("batch", "seq"), "positions"),
                  TensorDecl("attention_mask", "float32", ("batch", "cache"), "valid_mask"),
                  TensorDecl("im_mask", "float32", ("batch", "seq"), "image_mask"), *past]
        return group_subgraph(index, build, inputs, presents, make, seq_gears, cache_gears, bounds, cfg.hidden,
                              cfg.vocab_size, last, dtype)

    def kv_manifest(self, bounds: list[tuple[int, int]], cache_gears: list[int], dtype: str) -> dict:
        cfg = self.cfg
        return kv_manifest(self.kv_layout, cfg.layers, cfg.kv_heads, cfg.head_dim, bounds, cache_gears, dtype)

    @staticmethod
    @torch.no_grad()
    def reference_forward(group, x: torch.Tensor, prompt: int | None = None,
                          image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """A group over a whole sequence [1, T, H] with an empty cache (causal); ``image_mask``
        [1, T] marks the image positions (default: none)."""
        cfg, n, t = group.cfg, group.stop - group.start, x.shape[1]
        past = torch.zeros(n, 2, 1, cfg.kv_heads, 0, cfg.head_dim, dtype=x.dtype)
        cache = [past] if group.kv_layout == "stacked" else [past[j // 2, j % 2] for j in range(2 * n)]
        flags = torch.zeros(1, t) if image_mask is None else image_mask.float()
        return group(x, torch.arange(t)[None], torch.zeros(1, 0), flags, *cache)[0]


def random_llm(cfg: InternLM2Config, gears: Gears, seed: int, dtype: str) -> LlmParts:
    """Seeded random weights (the Llama kind's seeds; the LoRA factors at 0.1 like the rest)."""
    td, rope = getattr(torch, dtype), gears.rope_length
    bounds = group_bounds(cfg.layers, gears.layers_per_group)

    def group(i: int):
        a, b = bounds[i]
        module = InternLM2DecoderGroup(cfg, a, b, rope, gears.kv_layout)
        return cast_module(init_random_(module, seed + 10 + a, 0.1), td)

    return LlmParts(InternLM2Spec(cfg, kv_layout=gears.kv_layout), bounds,
                    lambda: cast_module(init_random_(InternLM2Embedding(cfg), seed + 4, 1.0), td), group)
