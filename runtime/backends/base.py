"""The session protocol every backend implements, and the gear-exact feed check."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as the manifest declares it; str dims are gear dims. ``role``
    says what the runtime feeds it or reads from it (decoder graphs; see runtime/schema.py)."""

    name: str
    dtype: str
    shape: tuple
    role: str | None = None

    @classmethod
    def from_manifest(cls, entry: dict) -> "TensorSpec":
        return cls(entry["name"], entry["dtype"], tuple(entry["shape"]), entry.get("role"))

    def concrete(self, gear: dict[str, int]) -> tuple[int, ...]:
        return tuple(gear[d] if isinstance(d, str) else d for d in self.shape)


class Session(Protocol):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def check_feeds(graph_name: str, specs: list[TensorSpec], gears: list[dict] | None,
                feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """Every backend feeds exactly one declared gear (what ATC's OM requires); return it."""
    missing = [s.name for s in specs if s.name not in feeds]
    if missing:
        raise InputError(f"graph '{graph_name}': missing inputs {missing}")
    for gear in gears or [{}]:
        if all(tuple(feeds[s.name].shape) == s.concrete(gear) for s in specs):
            return gear
    got = {s.name: tuple(feeds[s.name].shape) for s in specs}
    raise InputError(f"graph '{graph_name}': input shapes {got} match none of its gears {gears}")
