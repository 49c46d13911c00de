"""What every LLM kind shares: layer groups, the decoder gear grid, and the lazy builders."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

from vlm2om.runtime.errors import InputError

from vlm2om.exporters.ascend.atc import MAX_GEARS


def group_bounds(layers: int, per_group: int) -> list[tuple[int, int]]:
    per_group = max(1, min(per_group, layers))
    return [(s, min(s + per_group, layers)) for s in range(0, layers, per_group)]


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
