"""What every LLM kind shares: layer groups, the decoder gear grid, and the lazy builders."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

from vlm2om.runtime.errors import InputError

from vlm2om.exporters.ascend.atc import MAX_GEARS


def group_bounds(layers: int, per_group: int, last: int | None = None) -> list[tuple[int, int]]:
    """Layer groups [start, stop) of ``per_group`` layers; ``last``: the final group (the one with
    the LM head) holds at most that many layers, the others ``per_group`` each."""
    per_group = max(1, min(per_group, layers))
    if last is None or last >= per_group:
        return [(s, min(s + per_group, layers)) for s in range(0, layers, per_group)]
    head = layers - max(1, last)
    return [(s, min(s + per_group, head)) for s in range(0, head, per_group)] + [(head, layers)]


def decoder_gears(seq_gears: list[int], cache_gears: list[int], batch: int = 1) -> list[dict[str, int]]:
    gears = [{"batch": batch, "seq": s, "cache": c} for s, c in itertools.product(seq_gears, cache_gears)]
    if len(gears) > MAX_GEARS:
        raise InputError(f"{len(seq_gears)} --seq-gears x {len(cache_gears)} --cache-gears = {len(gears)} gears "
                         f"per decoder graph; ATC allows {MAX_GEARS}: give fewer")
    return gears


@dataclass
class LlmParts:
    """The LLM side before any weight is read; each ``build_*`` makes one graph's module."""

    spec: Any  # the LLM kind's decoder spec (e.g. llama.LlamaSpec)
    bounds: list[tuple[int, int]]
    build_embed: Callable[[], Any]
    build_group: Callable[[int], Any]

    @property
    def llama(self):
        """The kind's model config (a LlamaConfig for the Llama kind)."""
        return self.spec.cfg


# --- the KV cache's graph inputs and outputs, and its manifest entry, by layout ---------------

def kv_decls(layout: str, start: int, n: int, kv_heads: int, head_dim: int, dtype: str):
    """(past inputs, present outputs) of a group of ``n`` layers from ``start``: ``stacked`` one
    ``past_kv`` [n, 2, batch, kv_heads, cache, D] and one ``present_kv`` (new tokens only);
    ``per_layer`` a ``past_key_i``/``past_value_i`` [batch, kv_heads, cache, D] per layer."""
    from vlm2om.exporters.core.subgraph import TensorDecl

    if layout == "stacked":
        return ([TensorDecl("past_kv", dtype, (n, 2, "batch", kv_heads, "cache", head_dim), "past_kv")],
                [TensorDecl("present_kv", dtype, (n, 2, "batch", kv_heads, "seq", head_dim), "present_kv")])
    names = [(f"{kind}_{start + j}", kind, start + j) for j in range(n) for kind in ("key", "value")]
    return ([TensorDecl(f"past_{name}", dtype, ("batch", kv_heads, "cache", head_dim), f"past_{kind}", layer)
             for name, kind, layer in names],
            [TensorDecl(f"present_{name}", dtype, ("batch", kv_heads, "seq", head_dim), f"present_{kind}", layer)
             for name, kind, layer in names])


def kv_feed(layout: str, start: int, past) -> dict:
    """The verification feed of a cache ``past`` [n, 2, batch, kv_heads, cache, D] in ``layout``."""
    if layout == "stacked":
        return {"past_kv": past}
    return {f"past_{kind}_{start + j}": past[j, i] for j in range(past.shape[0])
            for i, kind in enumerate(("key", "value"))}


def kv_manifest(layout: str, layers: int, kv_heads: int, head_dim: int, bounds: list[tuple[int, int]],
                cache_gears: list[int], dtype: str) -> dict:
    """The manifest's ``kv_cache`` entry (see docs/bundle.md): keys after RoPE, new tokens only."""
    entry = {"stacked": {"layout": "[layers, 2 (key, value), batch, kv_heads, capacity, head_dim]",
                         "input": "past_kv", "output": "present_kv"},
             "per_layer": {"layout": "[batch, kv_heads, capacity, head_dim] per layer", "kind": "per_layer",
                           "input": "past_key_<layer>, past_value_<layer>",
                           "output": "present_key_<layer>, present_value_<layer>"}}[layout]
    return {
        "layout": entry["layout"], **({"kind": entry["kind"]} if "kind" in entry else {}),
        "keys": "after rotary embedding", "returns": "new tokens only",
        "input": entry["input"], "output": entry["output"], "mask": "attention_mask",
        "dtype": dtype, "num_layers": layers, "kv_heads": kv_heads, "head_dim": head_dim,
        "group_layers": [b - a for a, b in bounds], "capacity_gears": sorted(cache_gears),
    }


def group_subgraph(index: int, build, inputs: list, presents: list, make, seq_gears: list[int],
                   cache_gears: list[int], bounds: tuple[int, int], hidden: int, vocab: int, last: bool,
                   dtype: str):
    """``decoder_{index}`` from a kind's own inputs (hidden, positions, masks, cache) and presents:
    the last group also takes ``logits_index`` and returns fp32 logits (so an argmax sees no fp16
    ties), the others the next group's hidden states."""
    from vlm2om.exporters.core.subgraph import Subgraph, TensorDecl

    if last:
        inputs = [*inputs, TensorDecl("logits_index", "int64", ("batch",), "logits_index")]
    out = TensorDecl("logits", "float32", ("batch", vocab), "logits") if last else \
        TensorDecl("hidden_states_out", dtype, ("batch", "seq", hidden), "hidden")
    return Subgraph(f"decoder_{index}", build, inputs, [out, *presents], make,
                    decoder_gears(seq_gears, cache_gears), extra={"layers": list(bounds)})


def random_parts(spec, bounds: list[tuple[int, int]], make_group, make_embed, seed: int, dtype: str) -> LlmParts:
    """Seeded random weights for any kind: the embedding from ``seed + 4``, group [a, b) from
    ``seed + 10 + a`` (so a weight does not depend on how the layers are grouped);
    ``make_group(a, b)`` and ``make_embed()`` build the empty modules."""
    import torch

    from vlm2om.graphs.common import cast_module, init_random_

    td = getattr(torch, dtype)

    def group(i: int):
        a, b = bounds[i]
        return cast_module(init_random_(make_group(a, b), seed + 10 + a, 0.1), td)

    return LlmParts(spec, bounds, lambda: cast_module(init_random_(make_embed(), seed + 4, 1.0), td), group)


def empty_cache(group, kv_heads: int, dtype) -> list:
    """A group's cache arguments holding no position (the torch references' whole-sequence runs)."""
    import torch

    n = group.stop - group.start
    past = torch.zeros(n, 2, 1, kv_heads, 0, group.cfg.head_dim, dtype=dtype)
    return [past] if group.kv_layout == "stacked" else [past[j // 2, j % 2] for j in range(2 * n)]
