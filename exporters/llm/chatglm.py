"""The ChatGLM-6B decoder kind (VisualGLM-6B's LLM): graphs/chatglm.py as bundle graphs.

Graphs: ``embed`` input_ids -> inputs_embeds (word embeddings only), and ``decoder_N`` layer
groups taking hidden states, the 2-D positions [B, 2, S] (row 0 positions, row 1 block
positions), the cache's validity mask and one key and one value cache per layer (ChatGLM's cache
is always per layer), the last group also ``logits_index``. Attention is ``prefix_lm``: the
context ([..., gMASK, <sop>]) sees itself both ways, so it is prefilled in one chunk.

The graphs take the 2-D positions as an input of role ``positions_2d``; the runtime computes them
from each token's 1-D index and its row's prefix (context) length by the manifest's
``pipeline.positions.kind`` = ``glm_2d`` (docs/bundle.md), so no ChatGLM rule lives in the runtime
under a family name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from vlm2om.graphs.chatglm import ChatGLMConfig, ChatGLMDecoderGroup, ChatGLMEmbedding
from vlm2om.graphs.common import cast_module, init_random_

from vlm2om.exporters.core.options import Gears
from vlm2om.exporters.core.subgraph import Subgraph, TensorDecl
from vlm2om.exporters.llm.embed import embed_subgraph
from vlm2om.exporters.llm.common import LlmParts, decoder_gears, group_bounds

POSITIONS = {"kind": "glm_2d"}  # runtime/schema.py POSITIONS


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
    kv_layout = "per_layer"  # graphs/chatglm.py ChatGLMDecoderGroup.kv_layout
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
        per_layer = [(f"{kind}_{start + j}", kind, start + j) for j in range(n) for kind in ("key", "value")]

        def make(gear, gen):
            """A row's prompt ends inside the chunk or before it (then the chunk is answer tokens)."""
            b, s, c = gear["batch"], gear["seq"], gear["cache"]
            valid = int(torch.randint(0, c, (), generator=gen))
            mask = torch.zeros(b, c)
            mask[:, :valid] = 1
            prompt = torch.randint(2, max(3, valid + s + 1), (b,), generator=gen)
            index = valid + torch.arange(s).expand(b, s)
            return {
                "hidden_states": torch.randn(b, s, cfg.hidden, generator=gen).to(tdtype),
                "position_ids": glm_2d_positions(index, prompt),
                "attention_mask": mask,
                **{f"past_{name}": torch.randn(b, h, c, d, generator=gen).to(tdtype) for name, _, _ in per_layer},
                **({"logits_index": torch.randint(0, s, (b,), generator=gen)} if last else {}),
            }

        inputs = [TensorDecl("hidden_states", dtype, ("batch", "seq", cfg.hidden), "hidden"),
                  TensorDecl("position_ids", "int64", ("batch", 2, "seq"), "positions_2d"),
                  TensorDecl("attention_mask", "float32", ("batch", "cache"), "valid_mask"),
                  *(TensorDecl(f"past_{name}", dtype, ("batch", h, "cache", d), f"past_{kind}", layer)
                    for name, kind, layer in per_layer)]
        if last:
            inputs.append(TensorDecl("logits_index", "int64", ("batch",), "logits_index"))
        out = TensorDecl("logits", "float32", ("batch", cfg.vocab_size), "logits") if last else \
            TensorDecl("hidden_states_out", dtype, ("batch", "seq", cfg.hidden), "hidden")
        presents = [TensorDecl(f"present_{name}", dtype, ("batch", h, "seq", d), f"present_{kind}", layer)
                    for name, kind, layer in per_layer]
        return Subgraph(f"decoder_{index}", build, inputs, [out, *presents], make,
                        decoder_gears(seq_gears, cache_gears), extra={"layers": [start, stop]})

    def kv_manifest(self, bounds: list[tuple[int, int]], cache_gears: list[int], dtype: str) -> dict:
        """The manifest's ``kv_cache`` entry (see docs/bundle.md): per layer, keys after RoPE."""
        cfg = self.cfg
        return {
            "layout": "[batch, kv_heads, capacity, head_dim] per layer", "kind": "per_layer",
            "keys": "after rotary embedding", "returns": "new tokens only",
            "input": "past_key_<layer>, past_value_<layer>", "output": "present_key_<layer>, present_value_<layer>",
            "mask": "attention_mask", "dtype": dtype, "num_layers": cfg.layers, "kv_heads": cfg.heads,
            "head_dim": cfg.head_dim, "group_layers": [b - a for a, b in bounds], "capacity_gears": sorted(cache_gears),
        }

    @staticmethod
    @torch.no_grad()
    def reference_forward(group, x: torch.Tensor, prompt: int | None = None) -> torch.Tensor:
        """A decoder group over a whole sequence [1, T, H] with an empty cache: the first
        ``prompt`` positions are the context through <sop> (default: all of ``x``), the rest
        answer tokens. Unlike the causal kinds, ChatGLM's numbers depend on where the context ends."""
        cfg, n, t = group.cfg, group.stop - group.start, x.shape[1]
        index = torch.arange(t)[None]
        positions = glm_2d_positions(index, torch.tensor([t if prompt is None else prompt]))
        past = [torch.zeros(1, cfg.heads, 0, cfg.head_dim, dtype=x.dtype) for _ in range(2 * n)]
        return group(x, positions, torch.zeros(1, 0), *past)[0]


def random_llm(cfg: ChatGLMConfig, gears: Gears, seed: int, dtype: str) -> LlmParts:
    """Seeded random weights: the embedding from ``seed + 4``, group [a, b) from ``seed + 10 + a``
    (the Llama kind's seeds). The RoPE table covers ``gears.rope_length`` positions at least."""
    td, rope = getattr(torch, dtype), max(gears.rope_length, cfg.max_positions)
    bounds = group_bounds(cfg.layers, gears.layers_per_group)

    def group(i: int):
        a, b = bounds[i]
        return cast_module(init_random_(ChatGLMDecoderGroup(cfg, a, b, rope), seed + 10 + a, 0.1), td)

    return LlmParts(ChatGLMSpec(cfg), bounds,
                    lambda: cast_module(init_random_(ChatGLMEmbedding(cfg), seed + 4, 1.0), td), group)
