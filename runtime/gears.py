"""Pick the one declared gear a feed is padded to (ATC compiles exactly these shapes)."""
from __future__ import annotations

from .errors import InputError


def select_gear(graph_name: str, gears: list[dict[str, int]], exact: dict[str, int] | None = None,
                at_least: dict[str, int] | None = None) -> dict[str, int]:
    """The smallest gear with ``gear[d] == exact[d]`` and ``gear[d] >= at_least[d]``."""
    exact, at_least = exact or {}, at_least or {}
    fits = [g for g in gears
            if all(g[d] == v for d, v in exact.items()) and all(g[d] >= v for d, v in at_least.items())]
    if not fits:
        want = {**{d: f"={v}" for d, v in exact.items()}, **{d: f">={v}" for d, v in at_least.items()}}
        raise InputError(f"graph '{graph_name}': no gear fits {want}; declared gears: {gears}")
    return min(fits, key=lambda g: tuple(g[d] for d in sorted(g)))


def dim_values(gears: list[dict[str, int]], dim: str, where: dict[str, int] | None = None) -> list[int]:
    """Sorted distinct values of ``dim`` among the gears matching ``where``."""
    where = where or {}
    return sorted({g[dim] for g in gears if all(g[k] == v for k, v in where.items())})
