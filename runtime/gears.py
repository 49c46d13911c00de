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


def plan_chunks(n: int, sizes: list[int], call_cost: int = 16) -> list[int]:
    """Split ``n`` tokens into chunks, each padded to one of ``sizes``, minimising padded tokens
    processed plus ``call_cost`` per call (a call re-reads all weights). Largest chunks first.

    16: on 2 CPU cores a prefill token costs ~1 ms of GEMM at the bench preset's size and a call's
    weight read ~17 ms, so a call is worth about 16 tokens (2000 tokens: four 512 chunks with 48
    padded, rather than eight exact ones)."""
    best, pick = [0] * (n + 1), [0] * (n + 1)
    for m in range(1, n + 1):
        best[m], neg = min((g + call_cost + best[max(0, m - g)], -g) for g in sizes)  # ties: fewer calls
        pick[m] = -neg
    chunks = []
    while n > 0:
        chunks.append(min(pick[n], n))
        n -= chunks[-1]
    return sorted(chunks, reverse=True)
