"""Declarative description of one exported graph, shared by every recipe."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class TensorDecl:
    """A graph input/output: int dims are static, str dims are gear dims."""

    name: str
    dtype: str
    dims: tuple

    def shape(self, gear: dict[str, int]) -> tuple[int, ...]:
        return tuple(gear[d] if isinstance(d, str) else d for d in self.dims)


@dataclass
class Subgraph:
    """What to export as one ONNX file, and how to make inputs for any of its gears."""

    name: str
    module: nn.Module
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
        """Trace at the largest gear: no dynamic dim is 1, so none gets specialised away."""
        return max(self.gears, key=lambda g: tuple(sorted(g.values(), reverse=True)))

    def verify_gears(self) -> list[dict[str, int]]:
        """The trace gear and the smallest one, so a shape other than the traced one is run."""
        small = min(self.gears, key=lambda g: tuple(sorted(g.values())))
        big = self.trace_gear()
        return [big] if small == big else [big, small]
