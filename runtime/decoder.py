"""Embedding and decoder-group sessions stitched into a KV-cache decoder.

Every call is padded to a declared gear: the embed graph on ``seq``, each decoder group on
(``seq``, ``cache``). A prompt is prefilled in the chunks that waste the least padded work.
"""
from __future__ import annotations

import numpy as np

from .gears import dim_values, plan_chunks, select_gear
from .kv_cache import KVCache


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
        self.kv = kv
        self.hidden = pipe["hidden_size"]
        self.embed_dtype = np.dtype(pipe["embeds_dtype"])

    def new_cache(self) -> KVCache:
        kv = self.kv
        return KVCache(kv["group_layers"], kv["kv_heads"], kv["head_dim"], kv["dtype"], kv["capacity_gears"])

    def embed(self, ids: list[int]) -> np.ndarray:
        """Token ids -> embeddings [n, H], in chunks padded to the embed graph's seq gears."""
        out, start = [], 0
        for size in plan_chunks(len(ids), dim_values(self.embed_gears, "seq")):
            chunk, start = ids[start:start + size], start + size
            gear = select_gear(self.embed_name, self.embed_gears, at_least={"seq": len(chunk)})
            feed = np.zeros((1, gear["seq"]), np.int64)
            feed[0, :len(chunk)] = chunk
            res = self.embed_sess.run({"input_ids": feed})
            out.append(res["inputs_embeds"][0, :len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, self.hidden), self.embed_dtype)

    def forward(self, embeds: np.ndarray, cache: KVCache) -> np.ndarray:
        """Append ``embeds`` [n, H] to the cache; return the logits of the last one [V]."""
        n = len(embeds)
        cache.reserve(cache.length + n)
        logits, start = None, 0
        for size in plan_chunks(n, dim_values(self.dec_gears, "seq", {"cache": cache.capacity})):
            logits, start = self._step(embeds[start:start + size], cache), start + size
        return logits

    def _step(self, chunk: np.ndarray, cache: KVCache) -> np.ndarray:
        n = len(chunk)
        gear = select_gear(self.group_names[0], self.dec_gears, exact={"cache": cache.capacity},
                           at_least={"seq": n})
        s = gear["seq"]
        hidden = np.zeros((1, s, self.hidden), self.embed_dtype)
        hidden[0, :n] = chunk
        # Padding keeps counting positions, so the in-graph causal mask hides it from real tokens.
        positions = (cache.length + np.arange(s, dtype=np.int64))[None]
        presents = []
        for sess, buf in zip(self.groups, cache.buffers):
            res = sess.run({"hidden_states": hidden, "position_ids": positions,
                            "attention_mask": cache.mask, "past_kv": buf})
            presents.append(res["present_kv"])
            hidden = res.get("hidden_states_out")
        cache.append(presents, n)
        return res["logits"][0, n - 1].astype(np.float32)
