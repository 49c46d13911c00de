"""The InternLM2 decoder kind (InternLM-XComposer2's LLM): graphs/internlm2.py as bundle graphs.

Graphs: ``embed`` input_ids -> inputs_embeds, and ``decoder_N`` layer groups taking what the Llama
kind's take (hidden states, the cache's validity mask, the group's cache, the last group also
``logits_index``) but no positions, which the graph counts from the validity mask as the original
counts them from the key/value length (graphs/internlm2.py ``CountedPositions``: four dynamic dims
per ATC gear), plus ``im_mask`` [B, S] of role ``image_mask``: 1 on the prompt's image positions,
where Partial LoRA applies, 0 elsewhere and in every decode step, as the original computes it (the
runtime fills it from each prompt's layout). Attention is causal.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlm2om.graphs.internlm2 import CountedPositions, InternLM2Config, InternLM2DecoderGroup, InternLM2Embedding

from vlm2om.exporters.core.options import Gears
from vlm2om.exporters.core.subgraph import Subgraph, TensorDecl
from vlm2om.exporters.llm.common import LlmParts, empty_cache, group_bounds, random_parts
from vlm2om.exporters.llm.llama import LlamaSpec

# InternLM2's SentencePiece: <s> 1, </s> 2; the chat also stops at [UNUSED_TOKEN_145] (92542).
TOKENIZER = {"kind": "sentencepiece", "file": "tokenizer.model", "bos_id": 1, "eos_id": 2, "eos_ids": [2, 92542]}


def tokenizer_entry(end_id: int) -> dict:
    """The manifest's ``tokenizer`` entry of a model whose ``[UNUSED_TOKEN_145]`` is ``end_id``."""
    return {**TOKENIZER, "eos_ids": [TOKENIZER["eos_id"], end_id]}


@dataclass(frozen=True)
class InternLM2Spec(LlamaSpec):
    """The Llama kind's graphs (the same inputs, cache and head) plus ``im_mask``; ``cfg`` is an
    InternLM2Config, whose size fields have the LlamaConfig names the Llama kind reads."""

    cfg: InternLM2Config
    kv_layout: str = "stacked"
    tokenizer: dict = field(default_factory=lambda: dict(TOKENIZER))  # tokenizer_entry(...)

    def group_subgraph(self, index: int, build, bounds: tuple[int, int], seq_gears: list[int],
                       cache_gears: list[int], dtype: str) -> Subgraph:
        """The Llama kind's group without ``position_ids`` (graphs/internlm2.py CountedPositions)."""
        sg = super().group_subgraph(index, build, bounds, seq_gears, cache_gears, dtype)
        make = sg.make_inputs
        sg.inputs = [d for d in sg.inputs if d.role != "positions"]
        sg.build = lambda: CountedPositions(build(), max(seq_gears))
        sg.make_inputs = lambda gear, gen: {k: v for k, v in make(gear, gen).items() if k != "position_ids"}
        return sg

    def extra_inputs(self) -> list[TensorDecl]:
        return [TensorDecl("im_mask", "float32", ("batch", "seq"), "image_mask")]

    def extra_feeds(self, batch: int, seq: int, gen: torch.Generator) -> dict:
        """Image positions on about half of the new tokens, so PLoRA runs in the verification."""
        return {"im_mask": (torch.rand(batch, seq, generator=gen) > 0.5).float()}

    @staticmethod
    @torch.no_grad()
    def reference_forward(group, x: torch.Tensor, prompt: int | None = None,
                          image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """A group over a whole sequence [1, T, H] with an empty cache (causal); ``image_mask``
        [1, T] marks the image positions (default: none)."""
        t = x.shape[1]
        cache = empty_cache(group, group.cfg.kv_heads, x.dtype)
        flags = torch.zeros(1, t) if image_mask is None else image_mask.float()
        return group(x, torch.arange(t)[None], torch.zeros(1, 0), flags, *cache)[0]


# The last group holds one layer beside the 92544-row output (776 MB in fp16): with two, the full-size
# export's verification of that file peaked at 3.13 GiB (make bench-7b BENCH_MODEL=ixc2-vl). On the NPU
# this is one more graph run per token (17 files instead of 16 for the real model's 32 layers in pairs).
LAST_GROUP_LAYERS = 1


def internlm2_bounds(cfg: InternLM2Config, gears: Gears) -> list[tuple[int, int]]:
    return group_bounds(cfg.layers, gears.layers_per_group, last=LAST_GROUP_LAYERS)


def random_llm(cfg: InternLM2Config, gears: Gears, seed: int, dtype: str, tokenizer: dict | None = None) -> LlmParts:
    """Seeded random weights (``common.random_parts``; the LoRA factors at 0.1 like the rest);
    ``tokenizer``: the manifest entry (default: the real model's ids)."""
    rope = gears.rope_length
    return random_parts(InternLM2Spec(cfg, gears.kv_layout, tokenizer or dict(TOKENIZER)), internlm2_bounds(cfg, gears),
                        lambda a, b: InternLM2DecoderGroup(cfg, a, b, rope, gears.kv_layout),
                        lambda: InternLM2Embedding(cfg), seed, dtype)
