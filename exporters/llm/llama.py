"""The Llama (Vicuna) decoder kind: MiniGPT-4's Vicuna v0 and LLaVA-1.5's Vicuna v1.5.

Graphs (see graphs/llama.py): ``embed`` input_ids -> inputs_embeds, and ``decoder_N`` layer
groups taking hidden states, 1-D positions, the cache's validity mask and the group's stacked
past keys/values (the last group also ``logits_index``), returning the next group's hidden
states or fp32 logits, and the new tokens' keys/values. Attention is causal.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from vlm2om.graphs.llama import LlamaConfig, LlamaDecoderGroup, LlamaEmbedding

from vlm2om.exporters.core.options import Gears
from vlm2om.exporters.core.subgraph import Subgraph, TensorDecl
from vlm2om.exporters.llm.embed import embed_subgraph
from vlm2om.exporters.llm.common import (LlmParts, empty_cache, group_bounds, group_subgraph, kv_decls, kv_feed,
                                         kv_manifest, random_parts)


@dataclass(frozen=True)
class LlamaSpec:
    cfg: LlamaConfig
    kv_layout: str = "stacked"  # graphs/common.py KV_LAYOUTS
    attention = "causal"
    # A Llama SentencePiece tokenizer (LLaMA-1/2, Vicuna v0/v1.5, the tiny preset's): <unk>=0, <s>=1, </s>=2.
    tokenizer = {"kind": "sentencepiece", "file": "tokenizer.model", "bos_id": 1, "eos_id": 2, "eos_ids": [2]}
    special_tokens = {"bos": "<s>", "eos": "</s>", "unk": "<unk>"}

    @property
    def hidden(self) -> int:
        return self.cfg.hidden

    def embed_subgraph(self, build: Callable[[], nn.Module], seq_gears: list[int], dtype: str) -> Subgraph:
        return embed_subgraph(build, self.cfg.vocab_size, self.cfg.hidden, seq_gears, dtype)

    def group_subgraph(self, index: int, build: Callable[[], nn.Module], bounds: tuple[int, int],
                       seq_gears: list[int], cache_gears: list[int], dtype: str) -> Subgraph:
        """Layers ``bounds`` = [start, stop); ``build`` makes that LlamaDecoderGroup."""
        cfg, (start, stop) = self.cfg, bounds
        n, kvh, d = stop - start, cfg.kv_heads, cfg.head_dim
        tdtype, last = getattr(torch, dtype), stop == cfg.layers

        def make(gear, gen):
            b, s, c = gear["batch"], gear["seq"], gear["cache"]
            valid = int(torch.randint(1, c, (), generator=gen))
            mask = torch.zeros(b, c)
            mask[:, :valid] = 1
            past = torch.randn(n, 2, b, kvh, c, d, generator=gen).to(tdtype)
            feeds = {
                "hidden_states": torch.randn(b, s, cfg.hidden, generator=gen).to(tdtype),
                "position_ids": (valid + torch.arange(s)).expand(b, s).contiguous(),
                "attention_mask": mask, **kv_feed(self.kv_layout, start, past),
                **({"logits_index": torch.randint(0, s, (b,), generator=gen)} if last else {}),
            }
            return {**feeds, **self.extra_feeds(b, s, gen)}

        past, presents = kv_decls(self.kv_layout, start, n, kvh, d, dtype)
        inputs = [TensorDecl("hidden_states", dtype, ("batch", "seq", cfg.hidden), "hidden"),
                  TensorDecl("position_ids", "int64", ("batch", "seq"), "positions"),
                  TensorDecl("attention_mask", "float32", ("batch", "cache"), "valid_mask"), *self.extra_inputs(),
                  *past]
        return group_subgraph(index, build, inputs, presents, make, seq_gears, cache_gears, bounds, cfg.hidden,
                              cfg.vocab_size, last, dtype)

    def extra_inputs(self) -> list[TensorDecl]:
        """Inputs a kind built on this one adds after the masks (InternLM2's ``im_mask``)."""
        return []

    def extra_feeds(self, batch: int, seq: int, gen: torch.Generator) -> dict:
        """Their verification feeds (drawn after the others, so the Llama feeds stay as they were)."""
        return {}

    def kv_manifest(self, bounds: list[tuple[int, int]], cache_gears: list[int], dtype: str) -> dict:
        """The manifest's ``kv_cache`` entry (see docs/bundle.md)."""
        cfg = self.cfg
        return kv_manifest(self.kv_layout, cfg.layers, cfg.kv_heads, cfg.head_dim, bounds, cache_gears, dtype)

    @staticmethod
    @torch.no_grad()
    def reference_forward(group, x: torch.Tensor, prompt: int | None = None) -> torch.Tensor:
        """A decoder group over a whole sequence [1, T, H] with an empty cache (causal: where the
        prompt ends, ``prompt``, changes nothing)."""
        cache = empty_cache(group, group.cfg.kv_heads, x.dtype)
        return group(x, torch.arange(x.shape[1])[None], torch.zeros(1, 0), *cache)[0]


def random_llm(llama: LlamaConfig, gears: Gears, seed: int, dtype: str) -> LlmParts:
    """Seeded random weights (``common.random_parts``)."""
    rope = gears.rope_length
    return random_parts(LlamaSpec(llama, gears.kv_layout), group_bounds(llama.layers, gears.layers_per_group),
                        lambda a, b: LlamaDecoderGroup(llama, a, b, rope, gears.kv_layout),
                        lambda: LlamaEmbedding(llama), seed, dtype)


def checkpoint_llm(folder: Path, llama: LlamaConfig, keys, gears: Gears, dtype: str) -> LlmParts:
    """Builders reading a Hugging Face-style folder through ``llama_weights`` with ``keys``."""
    from vlm2om.exporters.llm import llama_weights as lw

    return lw.MODULES.lazy(lambda: folder, llama, keys, LlamaSpec(llama, gears.kv_layout),
                           group_bounds(llama.layers, gears.layers_per_group), dtype, gears.rope_length,
                           gears.kv_layout)
