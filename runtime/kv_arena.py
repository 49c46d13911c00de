"""Flat buffers the KV caches lay their capacity gears out in, kept from one cache to the next.

Why: a cache that outgrows its capacity gear used to allocate new, larger buffers and copy into
them, and each conversation or benchmark round allocated its own. Fresh memory costs a page
fault per 4 KB page on first write, and on a virtual machine that is slow: copying a 2000-token
cache of the 134M-parameter bench decoder into fresh 170 MB took about 1 s, the same copy into
memory already touched 20-80 ms, and which of the two a step paid varied from run to run.

So each cache buffer is a view of the start of one flat arena sized for the largest capacity
gear: a gear's ``[..., capacity, head_dim]`` layout is contiguous there, a growth moves the rows
within the arena (``grow``), and the arenas of a cache that is gone go back to the ``ArenaPool``
of its decoder for the next cache. Pages are mapped only as they are written, so a short chat
in a large arena costs its own size; what the pool keeps is bounded.
"""
from __future__ import annotations

import threading

import numpy as np


class ArenaPool:
    """Arenas of finished caches, handed to the next cache that fits; at most ``limit_bytes``
    (None: no bound) are kept, the largest ones first."""

    def __init__(self, limit_bytes: int | None = None):
        self.limit_bytes = limit_bytes
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, size: int, dtype: np.dtype) -> tuple[np.ndarray, bool]:
        """(a flat buffer of at least ``size`` elements, whether it may hold values of an earlier cache)."""
        with self._lock:
            fits = [i for i, a in enumerate(self._free) if a.dtype == dtype and a.size >= size]
            if fits:
                best = min(fits, key=lambda i: self._free[i].size)
                return self._free.pop(best), True
        return np.zeros(size, dtype), False

    def give(self, arenas: list[np.ndarray]) -> None:
        with self._lock:
            kept = sorted(self._free + list(arenas), key=lambda a: a.nbytes, reverse=True)
            if self.limit_bytes is not None:
                total, within = 0, []
                for a in kept:
                    if total + a.nbytes <= self.limit_bytes:
                        within.append(a)
                        total += a.nbytes
                kept = within
            self._free = kept

    @property
    def kept_bytes(self) -> int:
        return sum(a.nbytes for a in self._free)


def view(arena: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The first prod(shape) elements of ``arena`` as a contiguous array of ``shape``."""
    return arena[:int(np.prod(shape))].reshape(shape)


def grow(arena: np.ndarray, old: np.ndarray, shape: tuple[int, ...], keep: int) -> np.ndarray:
    """``arena``'s view of ``shape`` (a larger capacity, axis -2) holding the first ``keep`` slots
    of ``old`` (a view of the same arena), zero elsewhere. Rows move last to first, so that no
    row is overwritten before it has moved (row r's new start is at or after its old end)."""
    new = view(arena, shape)
    src = old.reshape(-1, *old.shape[-2:])
    dst = new.reshape(-1, *shape[-2:])
    for r in range(src.shape[0] - 1, -1, -1):
        dst[r, :keep] = src[r, :keep]  # numpy copies through a buffer where the two overlap
        dst[r, keep:] = 0
    return new
