"""Host-side KV cache buffers owned by the runtime (DESIGN.md: the KV-cache contract).

One buffer per decoder group, laid out ``[layers, 2, batch, kv_heads, capacity, head_dim]``
as the manifest's ``kv_cache.layout`` says, plus the validity mask ``[batch, capacity]``.
Writes touch only the new tokens' slots; the buffer is reallocated (copied once) only when
the sequence outgrows its capacity gear.
"""
from __future__ import annotations

import numpy as np

from .errors import InputError


class KVCache:
    def __init__(self, group_layers: list[int], kv_heads: int, head_dim: int, dtype: str,
                 capacity_gears: list[int], batch: int = 1):
        self.group_layers = group_layers
        self.shape_tail = (kv_heads, head_dim)
        self.dtype = np.dtype(dtype)
        self.gears = sorted(capacity_gears)
        self.batch = batch
        self.length = 0
        self.prefix = np.zeros(batch, np.int64)  # context length per row (prefix-LM attention)
        self._alloc(self.gears[0])

    def _alloc(self, capacity: int) -> None:
        h, d = self.shape_tail
        self.buffers = [np.zeros((n, 2, self.batch, h, capacity, d), self.dtype) for n in self.group_layers]
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
        old, old_mask, n = self.buffers, self.mask, self.length
        self._alloc(bigger[0])
        for new, prev in zip(self.buffers, old):
            new[..., :n, :] = prev[..., :n, :]
        self.mask[:, :n] = old_mask[:, :n]

    def append(self, presents: list[np.ndarray], count: int, valid: np.ndarray | None = None) -> None:
        """Write the first ``count`` new positions of each group's ``present_kv``; ``valid``
        [batch, count] marks which of them hold a real token per row (default: all)."""
        start, stop = self.length, self.length + count
        for buf, present in zip(self.buffers, presents):
            buf[..., start:stop, :] = present[..., :count, :]
        self.mask[:, start:stop] = 1.0 if valid is None else valid
        self.length = stop

    def select_rows(self, rows: list[int], batch: int) -> "KVCache":
        """A cache of ``batch`` rows holding ``rows`` of this one (the rest empty): a batch
        whose sequences finished moves to a smaller batch gear with one copy."""
        out = KVCache.__new__(KVCache)
        out.group_layers, out.shape_tail, out.dtype = self.group_layers, self.shape_tail, self.dtype
        out.gears, out.batch, out.length = self.gears, batch, self.length
        out.prefix = np.zeros(batch, np.int64)
        out.prefix[:len(rows)] = self.prefix[rows]
        out._alloc(self.capacity)
        n = self.length
        for new, old in zip(out.buffers, self.buffers):
            new[:, :, :len(rows), ..., :n, :] = old[:, :, rows, ..., :n, :]
        out.mask[:len(rows), :n] = self.mask[rows, :n]
        return out

    def truncate(self, length: int) -> None:
        """Forget positions from ``length`` on (the prefix stays valid and is reused)."""
        if length < self.length:
            self.mask[:, length:self.length] = 0.0
            self.length = length
