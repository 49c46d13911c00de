"""Subgraph specs for a Llama-family LLM: the token embedding and the decoder groups.

Shared by every recipe whose LLM is a Llama (MiniGPT-4's Vicuna, LLaVA's Vicuna v1.5).
"""
from __future__ import annotations

import itertools
from typing import Callable

import torch
from torch import nn

from vlm2om.graphs.llama import LlamaConfig

from vlm2om.exporters.core.subgraph import Subgraph, TensorDecl


def group_bounds(layers: int, per_group: int) -> list[tuple[int, int]]:
    per_group = max(1, min(per_group, layers))
    return [(s, min(s + per_group, layers)) for s in range(0, layers, per_group)]


def decoder_gears(seq_gears: list[int], cache_gears: list[int], batch: int = 1) -> list[dict[str, int]]:
    gears = [{"batch": batch, "seq": s, "cache": c} for s, c in itertools.product(seq_gears, cache_gears)]
    if len(gears) > 100:
        raise ValueError(f"{len(seq_gears)} seq x {len(cache_gears)} cache gears = {len(gears)}; ATC allows 100")
    return gears


def embed_subgraph(build: Callable[[], nn.Module], cfg: LlamaConfig, seq_gears: list[int],
                   dtype: str) -> Subgraph:
    def make(gear, gen):
        return {"input_ids": torch.randint(0, cfg.vocab_size, (gear["batch"], gear["seq"]), generator=gen)}

    return Subgraph(
        "embed", build,
        [TensorDecl("input_ids", "int64", ("batch", "seq"))],
        [TensorDecl("inputs_embeds", dtype, ("batch", "seq", cfg.hidden))],
        make, [{"batch": 1, "seq": s} for s in seq_gears])


def group_subgraph(index: int, build: Callable[[], nn.Module], cfg: LlamaConfig, bounds: tuple[int, int],
                   seq_gears: list[int], cache_gears: list[int], dtype: str) -> Subgraph:
    """Layers ``bounds`` = [start, stop) of ``cfg``; ``build`` makes that LlamaDecoderGroup."""
    start, stop = bounds
    n, kvh, d = stop - start, cfg.kv_heads, cfg.head_dim
    tdtype = getattr(torch, dtype)

    def make(gear, gen):
        b, s, c = gear["batch"], gear["seq"], gear["cache"]
        valid = int(torch.randint(1, c, (), generator=gen))
        mask = torch.zeros(b, c)
        mask[:, :valid] = 1
        return {
            "hidden_states": torch.randn(b, s, cfg.hidden, generator=gen).to(tdtype),
            "position_ids": (valid + torch.arange(s)).expand(b, s).contiguous(),
            "attention_mask": mask,
            "past_kv": torch.randn(n, 2, b, kvh, c, d, generator=gen).to(tdtype),
            **({"logits_index": torch.randint(0, s, (b,), generator=gen)} if last else {}),
        }

    last = stop == cfg.layers
    inputs = [TensorDecl("hidden_states", dtype, ("batch", "seq", cfg.hidden)),
              TensorDecl("position_ids", "int64", ("batch", "seq")),
              TensorDecl("attention_mask", "float32", ("batch", "cache")),
              TensorDecl("past_kv", dtype, (n, 2, "batch", kvh, "cache", d))]
    if last:  # logits of one position per row: see graphs/llama.py
        inputs.append(TensorDecl("logits_index", "int64", ("batch",)))
    out = TensorDecl("logits", dtype, ("batch", cfg.vocab_size)) if last else \
        TensorDecl("hidden_states_out", dtype, ("batch", "seq", cfg.hidden))
    return Subgraph(
        f"decoder_{index}", build, inputs,
        [out, TensorDecl("present_kv", dtype, (n, 2, "batch", kvh, "seq", d))],
        make, decoder_gears(seq_gears, cache_gears), extra={"layers": [start, stop]})


def llm_manifest(cfg: LlamaConfig, bounds: list[tuple[int, int]], cache_gears: list[int], dtype: str) -> dict:
    """The manifest's ``kv_cache`` entry (see docs/bundle.md)."""
    return {
        "layout": "[layers, 2 (key, value), batch, kv_heads, capacity, head_dim]",
        "keys": "after rotary embedding", "returns": "new tokens only",
        "input": "past_kv", "output": "present_kv", "mask": "attention_mask",
        "dtype": dtype, "num_layers": cfg.layers, "kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "group_layers": [b - a for a, b in bounds], "capacity_gears": sorted(cache_gears),
    }
