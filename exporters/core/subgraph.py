"""Declarative description of one exported graph, shared by every recipe."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class TensorDecl:
    """A graph input/output: int dims are static, str dims are gear dims; ``role`` tells the
    runtime what it feeds or reads there (runtime/schema.py lists the roles)."""

    name: str
    dtype: str
    dims: tuple
    role: str | None = None
    layer: int | None = None  # the decoder layer a per-layer KV tensor belongs to

    def shape(self, gear: dict[str, int]) -> tuple[int, ...]:
        return tuple(gear[d] if isinstance(d, str) else d for d in self.dims)


@dataclass
class Subgraph:
    """What to export as one ONNX file, and how to make inputs for any of its gears.

    ``build`` makes the module (reading its weights) only when the export reaches this
    graph, and the export drops it once the graph is written: one graph's weights in memory.
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: list[TensorDecl]
    outputs: list[TensorDecl]
    make_inputs: Callable[[dict[str, int], torch.Generator], dict[str, torch.Tensor]]
    gears: list[dict[str, int]] = field(default_factory=lambda: [{}])
    extra: dict = field(default_factory=dict)  # recorded in the manifest entry as-is

    @property
    def dynamic_dims(self) -> list[str]:
        """Dims that take more than one value across the gears (the rest are baked in)."""
        names = sorted({d for g in self.gears for d in g})
        return [d for d in names if len({g[d] for g in self.gears}) > 1]

    def manifest_shape(self, decl: TensorDecl) -> list:
        fixed = self.gears[0]
        dyn = set(self.dynamic_dims)
        return [d if isinstance(d, int) or d in dyn else fixed[d] for d in decl.dims]

    def manifest_gears(self) -> list[dict[str, int]] | None:
        dyn = self.dynamic_dims
        if not dyn:
            return None
        seen, out = set(), []
        for g in self.gears:
            key = tuple(g[d] for d in dyn)
            if key not in seen:
                seen.add(key)
                out.append({d: g[d] for d in dyn})
        return out

    def trace_gear(self) -> dict[str, int]:
        """The cheapest gear whose dynamic dims are all distinct and above 1, so the tracer
        specialises none of them away (a 1 or a coincidence would be baked in); the largest
        gear if no gear qualifies. Cheap matters: a 7B group is traced on the CPU."""
        dyn = self.dynamic_dims
        good = [g for g in self.gears if all(g[d] > 1 for d in dyn) and len({g[d] for d in dyn}) == len(dyn)]
        if good:
            return min(good, key=lambda g: (sum(g[d] for d in dyn), tuple(g[d] for d in dyn)))
        return max(self.gears, key=lambda g: tuple(sorted(g.values(), reverse=True)))

    def verify_gears(self) -> list[dict[str, int]]:
        """The trace gear and the smallest one, so a shape other than the traced one is run."""
        small = min(self.gears, key=lambda g: tuple(sorted(g.values())))
        trace = self.trace_gear()
        return [trace] if small == trace else [trace, small]
