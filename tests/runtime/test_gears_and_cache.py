"""Gear choice, prefill chunk planning and the KV cache's growth, on values worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest

from vlm2om.runtime.errors import InputError
from vlm2om.runtime.gears import plan_chunks, select_gear
from vlm2om.runtime.kv_cache import KVCache


def test_gear_selection():
    gears = [{"seq": s, "cache": c} for s in (1, 16, 64) for c in (128, 256)]
    assert select_gear("g", gears, exact={"cache": 256}, at_least={"seq": 2}) == {"seq": 16, "cache": 256}
    with pytest.raises(InputError, match="no gear fits"):
        select_gear("g", gears, exact={"cache": 512}, at_least={"seq": 1})


def test_chunk_plan_minimises_padded_work():
    assert plan_chunks(118, [1, 16, 64, 256]) == [64, 54]  # not one 256 chunk
    assert plan_chunks(1, [1, 16, 64]) == [1]
    assert plan_chunks(300, [1, 16, 64, 256]) == [256, 44]
    for n in range(1, 200):
        chunks = plan_chunks(n, [1, 16, 64])
        assert sum(chunks) == n and all(c <= 64 for c in chunks)


def test_kv_cache_grows_once_and_keeps_contents():
    c = KVCache([2, 1], kv_heads=2, head_dim=4, dtype="float32", capacity_gears=[4, 8])
    rng = np.random.default_rng(0)
    first = [rng.normal(size=(n, 2, 1, 2, 3, 4)).astype(np.float32) for n in (2, 1)]
    c.append(first, 3)
    c.reserve(6)
    assert c.capacity == 8 and c.mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    np.testing.assert_array_equal(c.buffers[0][..., :3, :], first[0])
    c.truncate(1)
    assert c.length == 1 and c.mask[0].sum() == 1
    with pytest.raises(InputError, match="largest cache gear"):
        c.reserve(9)
