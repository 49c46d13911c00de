"""Embedding and decoder-group sessions stitched into a KV-cache decoder.

Every call is padded to a declared gear: the embed graph on ``seq``, each decoder group on
(``seq``, ``cache``), and on ``batch`` too when the bundle was exported with batch gears
(a single conversation then runs at the batch-1 gear). A prompt is prefilled in the chunks
that waste the least padded work. ``runtime.batch`` drives the same sessions for several
sequences at once.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .gears import dim_values, plan_chunks, select_gear
from .kv_cache import KVCache

BATCH = "batch"


class Decoder:
    def __init__(self, bundle, sessions: dict):
        m = bundle.manifest
        pipe, kv = m["pipeline"], m["kv_cache"]
        self.embed_name = pipe["embed_graph"]
        self.group_names = pipe["decoder_graphs"]
        self.embed_sess = sessions[self.embed_name]
        self.groups = [sessions[n] for n in self.group_names]
        self.embed_gears = bundle.graph(self.embed_name)["gears"]
        self.dec_gears = bundle.graph(self.group_names[0])["gears"]
        self.logits_index = any(i["name"] == "logits_index" for i in bundle.graph(self.group_names[-1])["inputs"])
        self.kv = kv
        self.hidden = pipe["hidden_size"]
        self.embed_dtype = np.dtype(pipe["embeds_dtype"])
        # Called with the next-token logits [V] of every forward (verification taps it).
        self.on_logits: Callable[[np.ndarray], None] | None = None

    @staticmethod
    def batch_exact(gears: list[dict] | None, batch: int) -> dict[str, int]:
        """``{"batch": n}`` where the graph has batch gears, else nothing (batch is fixed at 1)."""
        return {BATCH: batch} if gears and BATCH in gears[0] else {}

    @property
    def batch_gears(self) -> list[int]:
        """Batch sizes the decoder graphs were compiled for ([1] without batch gears)."""
        both = set(dim_values(self.dec_gears, BATCH)) if self.batch_exact(self.dec_gears, 1) else {1}
        if self.batch_exact(self.embed_gears, 1):
            both &= set(dim_values(self.embed_gears, BATCH))
        return sorted(both)

    def new_cache(self, batch: int = 1) -> KVCache:
        kv = self.kv
        return KVCache(kv["group_layers"], kv["kv_heads"], kv["head_dim"], kv["dtype"], kv["capacity_gears"],
                       batch=batch)

    def embed(self, ids: list[int]) -> np.ndarray:
        """Token ids -> embeddings [n, H], in chunks padded to the embed graph's seq gears."""
        return self.embed_rows([ids], 1)[0, :len(ids)] if ids else np.zeros((0, self.hidden), self.embed_dtype)

    def embed_rows(self, rows: list[list[int]], batch: int) -> np.ndarray:
        """Token ids per row -> embeddings [batch, max len, H] (rows padded with zeros)."""
        width = max(len(r) for r in rows)
        out = np.zeros((batch, width, self.hidden), self.embed_dtype)
        exact = self.batch_exact(self.embed_gears, batch)
        start = 0
        for size in plan_chunks(width, dim_values(self.embed_gears, "seq", exact)):
            gear = select_gear(self.embed_name, self.embed_gears, exact=exact, at_least={"seq": size})
            feed = np.zeros((batch, gear["seq"]), np.int64)
            for i, ids in enumerate(rows):
                chunk = ids[start:start + size]
                feed[i, :len(chunk)] = chunk
            out[:, start:start + size] = self.embed_sess.run({"input_ids": feed})["inputs_embeds"][:, :size]
            start += size
        return out

    def forward(self, embeds: np.ndarray, cache: KVCache) -> np.ndarray:
        """Append ``embeds`` [n, H] to the cache; return the logits of the last one [V]."""
        n = len(embeds)
        cache.reserve(cache.length + n)
        logits, start = None, 0
        for size in self.chunks(n, cache):
            logits, start = self._step(embeds[start:start + size], cache), start + size
        if self.on_logits is not None:
            self.on_logits(logits)
        return logits

    def chunks(self, n: int, cache: KVCache) -> list[int]:
        """Prefill chunk sizes for ``n`` new positions at the cache's capacity and batch."""
        where = {"cache": cache.capacity, **self.batch_exact(self.dec_gears, cache.batch)}
        return plan_chunks(n, dim_values(self.dec_gears, "seq", where))

    def _step(self, chunk: np.ndarray, cache: KVCache) -> np.ndarray:
        n = len(chunk)
        s = self.gear(cache, n)["seq"]
        hidden = np.zeros((1, s, self.hidden), self.embed_dtype)
        hidden[0, :n] = chunk
        # Padding keeps counting positions, so the in-graph causal mask hides it from real tokens.
        positions = (cache.length + np.arange(s, dtype=np.int64))[None]
        logits, presents = self.run_groups(hidden, positions, cache, np.array([n - 1], np.int64))
        cache.append(presents, n)
        return logits[0].astype(np.float32)

    def gear(self, cache: KVCache, n: int) -> dict[str, int]:
        """The decoder gear for ``n`` new positions at the cache's capacity and batch."""
        exact = {"cache": cache.capacity, **self.batch_exact(self.dec_gears, cache.batch)}
        return select_gear(self.group_names[0], self.dec_gears, exact=exact, at_least={"seq": n})

    def run_groups(self, hidden: np.ndarray, positions: np.ndarray, cache: KVCache, index: np.ndarray):
        """Chain the groups on gear-shaped feeds; return (the logits at position ``index[b]`` of each
        row b [B, V], present_kv per group). A bundle whose last group returns logits at every
        position [B, S, V] (exported before ``logits_index``) is read by picking them here."""
        presents, last = [], self.groups[-1]
        for sess, buf in zip(self.groups, cache.buffers):
            feeds = {"hidden_states": hidden, "position_ids": positions, "attention_mask": cache.mask, "past_kv": buf}
            if sess is last and self.logits_index:
                feeds["logits_index"] = index
            res = sess.run(feeds)
            presents.append(res["present_kv"])
            hidden = res.get("hidden_states_out")
        logits = res["logits"]
        return (logits if logits.ndim == 2 else logits[np.arange(len(index)), index]), presents
