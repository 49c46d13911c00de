"""Host-side KV cache buffers owned by the runtime (DESIGN.md: the KV-cache contract).

The manifest's ``kv_cache`` entry says how the decoder graphs take the cache:

* ``stacked`` (the default): one buffer per decoder group, ``[layers, 2, batch, kv_heads,
  capacity, head_dim]``, fed as the group's ``past_kv``;
* ``per_layer``: a key and a value buffer per layer, ``[batch, kv_heads, capacity, head_dim]``,
  fed as ``past_key``/``past_value`` of that layer (no graph has to split a stack, which costs a
  copy of the whole cache every step on onnxruntime).

Either way the capacity is the second-to-last axis, plus one validity mask ``[batch, capacity]``.
Writes touch only the new tokens' slots; the buffers are moved to the next capacity gear (one
copy, inside the same arena: kv_arena.py) only when the sequence outgrows its gear. Outside the
slots written, a buffer holds zeros.
"""
from __future__ import annotations

import weakref

import numpy as np

from .errors import InputError
from .kv_arena import ArenaPool, grow, view

KINDS = ("stacked", "per_layer")


class KVCache:
    def __init__(self, group_layers: list[int], kv_heads: int, head_dim: int, dtype: str,
                 capacity_gears: list[int], batch: int = 1, kind: str = "stacked", pool: ArenaPool | None = None):
        self.group_layers, self.kind = group_layers, kind
        self.shape_tail = (kv_heads, head_dim)
        self.dtype = np.dtype(dtype)
        self.gears = sorted(capacity_gears)
        self.batch = batch
        self.length = 0
        self.prefix = np.zeros(batch, np.int64)  # context length per row (prefix-LM attention)
        self._arenas(pool or ArenaPool(0))
        self._alloc(self.gears[0])

    def _arenas(self, pool: ArenaPool) -> None:
        """One arena per buffer, for the largest gear; they go back to ``pool`` with this cache."""
        self.pool, self.arena, stale = pool, {}, []
        for k in self.keys:
            self.arena[k], dirty = pool.take(int(np.prod(self._shape(k, self.gears[-1]))), self.dtype)
            stale.append(dirty)
        self._stale = any(stale)
        weakref.finalize(self, pool.give, list(self.arena.values()))

    @property
    def keys(self) -> list[tuple[str, int]]:
        """The buffers by (what, index): ("kv", group) stacked, ("key"|"value", layer) per layer."""
        if self.kind == "stacked":
            return [("kv", g) for g in range(len(self.group_layers))]
        return [(what, layer) for layer in range(sum(self.group_layers)) for what in ("key", "value")]

    def _shape(self, key: tuple[str, int], capacity: int) -> tuple[int, ...]:
        h, d = self.shape_tail
        if key[0] == "kv":
            return (self.group_layers[key[1]], 2, self.batch, h, capacity, d)
        return (self.batch, h, capacity, d)

    @staticmethod
    def _batch_axis(key: tuple[str, int]) -> int:
        return 2 if key[0] == "kv" else 0

    def _alloc(self, capacity: int) -> None:
        """Empty buffers of ``capacity`` (an arena from the pool may hold an earlier cache's values)."""
        self.arrays = {k: view(self.arena[k], self._shape(k, capacity)) for k in self.keys}
        if self._stale:
            for a in self.arrays.values():
                a.fill(0)
        self.mask = np.zeros((self.batch, capacity), np.float32)
        self.capacity = capacity

    @property
    def max_capacity(self) -> int:
        return self.gears[-1]

    def reserve(self, total: int) -> None:
        """Make room for ``total`` positions, moving to the next capacity gear if needed."""
        if total <= self.capacity:
            return
        bigger = [g for g in self.gears if g >= total]
        if not bigger:
            raise InputError(f"sequence of {total} tokens exceeds the largest cache gear "
                             f"({self.max_capacity}); re-export with larger --cache-gears")
        capacity, n = bigger[0], self.length
        self.arrays = {k: grow(self.arena[k], a, self._shape(k, capacity), n) for k, a in self.arrays.items()}
        mask = np.zeros((self.batch, capacity), np.float32)
        mask[:, :n] = self.mask[:, :n]
        self.mask, self.capacity = mask, capacity

    def append(self, presents: dict[tuple[str, int], np.ndarray], count: int, valid: np.ndarray | None = None) -> None:
        """Write the first ``count`` new positions of every buffer's present tensor; ``valid``
        [batch, count] marks which of them hold a real token per row (default: all)."""
        start, stop = self.length, self.length + count
        for k, present in presents.items():
            self.arrays[k][..., start:stop, :] = present[..., :count, :]
        self.mask[:, start:stop] = 1.0 if valid is None else valid
        self.length = stop

    def select_rows(self, rows: list[int], batch: int) -> "KVCache":
        """A cache of ``batch`` rows holding ``rows`` of this one (the rest empty): a batch
        whose sequences finished moves to a smaller batch gear with one copy."""
        out = KVCache.__new__(KVCache)
        out.group_layers, out.kind, out.shape_tail, out.dtype = self.group_layers, self.kind, self.shape_tail, self.dtype
        out.gears, out.batch, out.length = self.gears, batch, self.length
        out.prefix = np.zeros(batch, np.int64)
        out.prefix[:len(rows)] = self.prefix[rows]
        out._arenas(self.pool)
        out._alloc(self.capacity)
        n = self.length
        for k, new in out.arrays.items():
            src = np.take(self.arrays[k][..., :n, :], rows, axis=self._batch_axis(k))
            index = [slice(None)] * new.ndim
            index[self._batch_axis(k)], index[-2] = slice(0, len(rows)), slice(0, n)
            new[tuple(index)] = src
        out.mask[:len(rows), :n] = self.mask[rows, :n]
        return out

    def truncate(self, length: int) -> None:
        """Forget positions from ``length`` on (the prefix stays valid and is reused)."""
        if length < self.length:
            self.mask[:, length:self.length] = 0.0
            self.length = length
