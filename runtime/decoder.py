"""Embedding and decoder-group sessions stitched into a KV-cache decoder, fed by role.

Every graph input of the embed and decoder graphs carries a role in the manifest (see
``runtime/schema.py``), so the runtime builds each feed from what the input *is*, never from its
name: ``hidden`` (embeddings, or the previous group's output), ``positions`` [B, S], ``valid_mask``
[B, C] (which cache slots hold a token), ``past_kv`` (the group's stacked cache) or ``past_key``/``past_value`` (one layer's, with its
``layer`` index), ``logits_index``
[B] (the one position per row whose logits are wanted), ``image_mask`` [B, S] (1 on image
positions during prefill, 0 elsewhere and in every decode step: InternLM-XComposer2's ``im_mask``)
and ``prefix_length`` [B] (prefix-LM attention: how many positions form the context), and
``positions_2d`` [B, 2, S] (two position rows, computed by ``pipeline.positions.kind`` from the
same 1-D positions and each row's prefix length: ``glm_2d``, ChatGLM's position and block position).

Every call is padded to a declared gear: the embed graph on ``seq``, each decoder group on
(``seq``, ``cache``), and on ``batch`` too when the bundle was exported with batch gears (a
single conversation then runs at the batch-1 gear). A causal prompt is prefilled in the chunks
that waste the least padded work; a prefix-LM context sees itself both ways, so it is prefilled
in one chunk, and a new turn cannot reuse a cached prefix (it changes the context).
"""
from __future__ import annotations

import numpy as np

from .errors import BundleError, InputError
from .gears import dim_values, plan_chunks, select_gear
from .kv_arena import ArenaPool
from .kv_cache import KVCache
from .schema import ATTENTION, POSITIONS

BATCH = "batch"
INPUT_ROLES = ("hidden", "positions", "valid_mask", "past_kv", "past_key", "past_value", "logits_index",
               "image_mask", "prefix_length", "positions_2d")
OUTPUT_ROLES = ("hidden", "logits", "present_kv", "present_key", "present_value")
# Cache roles -> the KVCache buffer they read or write: a group's stack, or one layer's key or value.
CACHE_ROLES = {"past_kv": "kv", "present_kv": "kv", "past_key": "key", "present_key": "key",
               "past_value": "value", "present_value": "value"}


def glm_2d(positions: np.ndarray, prefix: np.ndarray) -> np.ndarray:
    """[B, 2, S]: (position, block position) of the 1-D positions [B, S] of rows whose context
    (through <sop>, after [gMASK]) has ``prefix`` [B] positions. Before <sop>: (p, 0); from <sop>
    on, answer tokens and right padding alike: (prefix - 2, p - prefix + 2), the [gMASK] index and
    block positions counting 1, 2, ... A row without a context (prefix < 2, an unused batch row)
    gets (p, 0)."""
    p = prefix.astype(np.int64)[:, None]
    after = (p >= 2) & (positions >= p - 1)
    return np.stack([np.where(after, p - 2, positions), np.where(after, positions - p + 2, 0)], axis=1)


# pipeline.positions.kind -> how its positions_2d are computed (None: it gives no 2-D positions).
TWO_D = {"linear": None, "glm_2d": glm_2d}


def _roles(bundle, name: str, kind: str, known: tuple[str, ...], group: int = 0) -> dict:
    """role (or, for a cache tensor, its KVCache buffer key) -> tensor name, for one graph's
    inputs or outputs; unknown roles fail at open."""
    out = {}
    for spec in bundle.graph(name)[kind]:
        role = spec.get("role")
        if role not in known:
            raise BundleError(f"graph '{name}' {kind[:-1]} '{spec['name']}' has role {role!r}, which this runtime "
                              f"does not feed (it knows {', '.join(known)}); upgrade vlm2om")
        if role in CACHE_ROLES:
            what = CACHE_ROLES[role]
            if what != "kv" and not isinstance(spec.get("layer"), int):
                raise BundleError(f"graph '{name}' {kind[:-1]} '{spec['name']}' ({role}) names no layer")
            out[(what, group if what == "kv" else spec["layer"])] = spec["name"]
        else:
            out[role] = spec["name"]
    return out


def _gears(entry: dict, dims: dict[str, tuple[str, int]]) -> list[dict[str, int]]:
    """The graph's gears with every dim the runtime picks (batch, seq, cache) present: a dim an
    export fixed (it had one value, so it is not a gear dim) takes its static value from the shape
    of the input with that role, so a bundle with one cache or seq gear runs like any other."""
    shapes = {s.get("role"): s["shape"] for s in entry["inputs"]}
    fixed = {dim: shapes[role][axis] for dim, (role, axis) in dims.items()
             if role in shapes and isinstance(shapes[role][axis], int)}
    return [{**fixed, **g} for g in entry.get("gears") or [{}]]


class Decoder:
    def __init__(self, bundle, sessions: dict):
        m = bundle.manifest
        pipe, self.kv = m["pipeline"], m["kv_cache"]
        self.embed_name, self.group_names = pipe["embed_graph"], pipe["decoder_graphs"]
        self.embed_sess = sessions[self.embed_name]
        self.groups = [sessions[n] for n in self.group_names]
        self.embed_io = (_roles(bundle, self.embed_name, "inputs", ("token_ids",))["token_ids"],
                         _roles(bundle, self.embed_name, "outputs", ("embeds",))["embeds"])
        self.inputs = [_roles(bundle, n, "inputs", INPUT_ROLES, g) for g, n in enumerate(self.group_names)]
        self.outputs = [_roles(bundle, n, "outputs", OUTPUT_ROLES, g) for g, n in enumerate(self.group_names)]
        self.mask_dtypes = [np.dtype(next((s["dtype"] for s in bundle.graph(n)["inputs"] if s.get("role") == "image_mask"),
                                          "float32")) for n in self.group_names]
        self.embed_gears = _gears(bundle.graph(self.embed_name), {"batch": ("token_ids", 0), "seq": ("token_ids", 1)})
        self.dec_gears = _gears(bundle.graph(self.group_names[0]),
                                {"batch": ("hidden", 0), "seq": ("hidden", 1), "cache": ("valid_mask", 1)})
        if 1 not in dim_values(self.dec_gears, "seq"):  # checked once here, not in every decode step
            raise BundleError(f"graph '{self.group_names[0]}' has no seq gear of 1, which decoding needs")
        self.attention = pipe.get("attention", "causal")
        if self.attention not in ATTENTION:
            raise BundleError(f"attention kind '{self.attention}' is not known to this runtime; upgrade vlm2om")
        kind = (pipe.get("positions") or {}).get("kind", "linear")
        if kind not in POSITIONS:
            raise BundleError(f"positions kind '{kind}' is not known to this runtime; upgrade vlm2om")
        self.two_d = TWO_D[kind] if any("positions_2d" in ins for ins in self.inputs) else None
        if self.two_d is None and any("positions_2d" in ins for ins in self.inputs):
            raise BundleError(f"the decoder graphs take positions_2d, but positions kind '{kind}' gives none")
        self.hidden = pipe["hidden_size"]
        self.embed_dtype = np.dtype(pipe["embeds_dtype"])
        self.kv_pool: ArenaPool | None = None  # made by the first new_cache

    @property
    def reuses_prefix(self) -> bool:
        """A cached prefix stays valid for a longer prompt only where attention is causal."""
        return self.attention == "causal"

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
        """An empty cache whose buffers come from this decoder's arena pool (runtime/kv_arena.py),
        which keeps the arenas of one cache at the largest capacity and batch gears."""
        kv = self.kv
        if self.kv_pool is None:
            slots = sum(kv["group_layers"]) * 2 * max(self.batch_gears) * kv["kv_heads"] * max(kv["capacity_gears"])
            self.kv_pool = ArenaPool(slots * kv["head_dim"] * np.dtype(kv["dtype"]).itemsize)
        return KVCache(kv["group_layers"], kv["kv_heads"], kv["head_dim"], kv["dtype"], kv["capacity_gears"],
                       batch=batch, kind=kv.get("kind", "stacked"), pool=self.kv_pool)

    def embed(self, ids: list[int]) -> np.ndarray:
        """Token ids -> embeddings [n, H], in chunks padded to the embed graph's seq gears."""
        return self.embed_rows([ids], 1)[0, :len(ids)] if ids else np.zeros((0, self.hidden), self.embed_dtype)

    def embed_rows(self, rows: list[list[int]], batch: int) -> np.ndarray:
        """Token ids per row -> embeddings [batch, max len, H] (rows padded with zeros)."""
        width = max(len(r) for r in rows)
        out = np.zeros((batch, width, self.hidden), self.embed_dtype)
        exact = self.batch_exact(self.embed_gears, batch)
        feed_name, out_name = self.embed_io
        start = 0
        for size in plan_chunks(width, dim_values(self.embed_gears, "seq", exact)):
            gear = select_gear(self.embed_name, self.embed_gears, exact=exact, at_least={"seq": size})
            feed = np.zeros((batch, gear["seq"]), np.int64)
            for i, ids in enumerate(rows):
                chunk = ids[start:start + size]
                feed[i, :len(chunk)] = chunk
            out[:, start:start + size] = self.embed_sess.run({feed_name: feed})[out_name][:, :size]
            start += size
        return out

    def chunks(self, n: int, cache: KVCache) -> list[int]:
        """Prefill chunk sizes for ``n`` new positions at the cache's capacity and batch."""
        where = {"cache": cache.capacity, **self.batch_exact(self.dec_gears, cache.batch)}
        sizes = dim_values(self.dec_gears, "seq", where)
        if self.attention == "prefix_lm":
            if n > max(sizes):
                raise InputError(f"a prefix-LM context of {n} positions must be prefilled in one chunk, but the "
                                 f"largest seq gear is {max(sizes)}; re-export with a larger --seq-gears")
            return [n]
        return plan_chunks(n, sizes)

    def gear(self, cache: KVCache, n: int) -> dict[str, int]:
        """The decoder gear for ``n`` new positions at the cache's capacity and batch."""
        exact = {"cache": cache.capacity, **self.batch_exact(self.dec_gears, cache.batch)}
        return select_gear(self.group_names[0], self.dec_gears, exact=exact, at_least={"seq": n})

    def prefill(self, rows: list[np.ndarray], cache: KVCache, image_masks: list[np.ndarray] | None = None):
        """Append each row's embeddings [n_i, H] to its cache row, from slot ``cache.length`` on;
        return the logits [len(rows), V] after each row's last position. Shorter rows get padding
        that is masked out and keeps counting positions, so no real token sees it in a chunk."""
        lengths, base = [len(r) for r in rows], cache.length
        longest = max(lengths)
        if self.attention == "prefix_lm":
            cache.reserve(base + longest)
        out, start = None, 0
        for size in self.chunks(longest, cache):
            # A chunk attends over the cache as it is (the smallest capacity gear that holds what
            # exists so far) and its own new keys; the cache grows for them only afterwards.
            s = self.gear(cache, size)["seq"]
            hidden = np.zeros((cache.batch, s, self.hidden), self.embed_dtype)
            valid = np.zeros((cache.batch, size), np.float32)
            flags = np.zeros((cache.batch, s), np.float32)
            for i, r in enumerate(rows):
                real = r[start:start + size]
                hidden[i, :len(real)] = real
                valid[i, :len(real)] = 1.0
                if image_masks is not None:
                    flags[i, :len(real)] = image_masks[i][start:start + size]
            positions = np.broadcast_to(base + start + np.arange(s, dtype=np.int64), (cache.batch, s)).copy()
            ends = [i for i, n in enumerate(lengths) if start <= n - 1 < start + size]  # rows ending here
            index = np.zeros(cache.batch, np.int64)
            index[ends] = [lengths[i] - 1 - start for i in ends]
            prefix = np.zeros(cache.batch, np.int64)
            prefix[:len(rows)] = [base + n for n in lengths]
            logits, presents = self._run(hidden, positions, cache, index, flags, prefix)
            cache.reserve(cache.length + size)
            cache.append(presents, size, valid)
            if out is None:
                out = np.zeros((len(rows), logits.shape[-1]), np.float32)
            out[ends] = logits[ends]
            start += size
        cache.prefix[:len(rows)] = [base + n for n in lengths]
        return out

    def step(self, cache: KVCache, tokens: list[int | None], positions: list[int]) -> np.ndarray:
        """One token per row (None: a finished row kept in the gear, masked out), all written to
        the same new slot; returns the logits [cache.batch, V]."""
        hidden = self.embed_rows([[0 if t is None else t] for t in tokens], cache.batch)
        pos = np.zeros((cache.batch, 1), np.int64)
        pos[:len(positions), 0] = positions
        valid = np.zeros((cache.batch, 1), np.float32)
        valid[:len(tokens), 0] = [t is not None for t in tokens]
        logits, presents = self._run(hidden, pos, cache, np.zeros(cache.batch, np.int64),
                                     np.zeros((cache.batch, 1), np.float32), cache.prefix)
        cache.reserve(cache.length + 1)  # the new slot, after the step read the cache as it was
        cache.append(presents, 1, valid)
        return logits.astype(np.float32)

    def _run(self, hidden, positions, cache: KVCache, index, image_mask, prefix):
        """Chain the groups on gear-shaped feeds; return (the logits at position ``index[b]`` of each
        row b [B, V], the new keys/values by cache buffer). A bundle whose last group returns logits
        at every position [B, S, V] (exported before ``logits_index``) is read by picking them here."""
        presents, res = {}, {}
        shared = {"positions": positions, "valid_mask": cache.mask, "logits_index": index,
                  "prefix_length": prefix, **cache.arrays}
        if self.two_d is not None:
            shared["positions_2d"] = self.two_d(positions, prefix)
        for sess, ins, outs, flag_dtype in zip(self.groups, self.inputs, self.outputs, self.mask_dtypes):
            values = {**shared, "hidden": hidden}
            if "image_mask" in ins:
                values["image_mask"] = image_mask.astype(flag_dtype)
            res = sess.run({name: values[key] for key, name in ins.items()})
            presents.update({key: res[name] for key, name in outs.items() if isinstance(key, tuple)})
            hidden = res.get(outs.get("hidden"))
        logits = res[self.outputs[-1]["logits"]]
        if logits.ndim == 3:
            logits = logits[np.arange(len(index)), index]
        return logits.astype(np.float32, copy=False), presents
