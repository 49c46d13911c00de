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
    c.append(dict(zip(c.keys, first)), 3)
    c.reserve(6)
    assert c.capacity == 8 and c.mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    np.testing.assert_array_equal(c.arrays[("kv", 0)][..., :3, :], first[0])
    c.truncate(1)
    assert c.length == 1 and c.mask[0].sum() == 1
    with pytest.raises(InputError, match="largest cache gear"):
        c.reserve(9)


def test_per_layer_cache_holds_what_the_stacked_one_holds():
    """The per-layer buffers are the stacked group buffers' layers: same contents after appends,
    a gear change and a row selection."""
    rng = np.random.default_rng(1)
    stacked = KVCache([2, 1], 2, 4, "float32", [4, 8], batch=3)
    layers = KVCache([2, 1], 2, 4, "float32", [4, 8], batch=3, kind="per_layer")
    assert layers.keys == [("key", 0), ("value", 0), ("key", 1), ("value", 1), ("key", 2), ("value", 2)]
    for count in (3, 2):
        new = [rng.normal(size=(n, 2, 3, 2, count, 4)).astype(np.float32) for n in (2, 1)]
        valid = (rng.random((3, count)) > 0.3).astype(np.float32)
        for c in (stacked, layers):
            c.reserve(c.length + count)
        stacked.append(dict(zip(stacked.keys, new)), count, valid)
        per = np.concatenate(new)  # [3 layers, 2, batch, heads, count, dim]
        layers.append({(w, l): per[l, int(w == "value")] for w, l in layers.keys}, count, valid)
    for c in (stacked, layers):
        assert c.capacity == 8 and c.length == 5
    small_s, small_l = stacked.select_rows([2, 0], 2), layers.select_rows([2, 0], 2)
    for big, small in ((stacked, small_s), (layers, small_l)):
        np.testing.assert_array_equal(small.mask[:, :5], big.mask[[2, 0], :5])
    whole = np.concatenate([small_s.arrays[("kv", 0)], small_s.arrays[("kv", 1)]])
    for (what, layer), arr in small_l.arrays.items():
        np.testing.assert_array_equal(arr, whole[layer, int(what == "value")])


def test_arena_growth_keeps_contents_and_zeros_the_rest():
    """A growth moves every row within its arena (rows last to first); a later cache from the same
    pool sees zeros where the earlier one wrote, and the pool keeps at most its limit."""
    import gc

    from vlm2om.runtime.kv_arena import ArenaPool

    rng = np.random.default_rng(2)
    pool = ArenaPool()
    for kind in ("stacked", "per_layer"):
        c = KVCache([2, 1], 3, 4, "float32", [4, 8, 16], batch=2, kind=kind, pool=pool)
        first = {k: rng.normal(size=a.shape[:-2] + (3, 4)).astype(np.float32) for k, a in c.arrays.items()}
        c.append(first, 3)
        for total in (6, 13):
            c.reserve(total)
            for k, a in c.arrays.items():
                assert a.flags.c_contiguous and a.shape[-2] == c.capacity
                np.testing.assert_array_equal(a[..., :3, :], first[k])
                assert not a[..., 3:, :].any()
        assert c.capacity == 16
        del c
        gc.collect()  # its arenas go back to the pool
        assert pool.kept_bytes > 0
        again = KVCache([2, 1], 3, 4, "float32", [4, 8, 16], batch=2, kind=kind, pool=pool)
        assert all(not a.any() for a in again.arrays.values())
        again.reserve(16)
        assert all(not a.any() for a in again.arrays.values())
        del again
        gc.collect()
    small = ArenaPool(limit_bytes=100)
    small.give([np.zeros(10, np.float32), np.zeros(30, np.float32), np.zeros(20, np.float32)])
    assert small.kept_bytes == 80  # largest first within 100 bytes: 30 elements (120 B) never fit, 20 do, 10 no longer
    arena, stale = small.take(15, np.dtype(np.float32))
    assert arena.size == 20 and stale and small.kept_bytes == 0
    fresh, stale = small.take(40, np.dtype(np.float32))
    assert fresh.size == 40 and not stale and not fresh.any()
