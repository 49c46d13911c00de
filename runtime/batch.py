"""Batched generation: several prompts (each with its image) decoded together on batch gears.

Row ``i`` of the KV cache holds sequence ``i``. A prompt is prefilled into slots
``0..n_i-1``; rows with shorter prompts get padding that is masked out, and their padding
keeps counting positions so no real token sees it inside a chunk. Every decode step writes
one slot for all rows, with each row's own next position, so a row attends to exactly the
keys a batch of one would hold, only at other slots: each sequence gets the tokens a batch
of one produces. A row stops on its own (EOS, stop string, length); once the live rows fit
a smaller batch gear the cache moves there with one copy.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError
from .generation import GenerationConfig, Sampler, StopText
from .pipeline import Answer
from .prompts import Conversation, clean_answer, tokenize_prompt


@dataclass
class SequenceResult(Answer):
    logits: list[np.ndarray] = field(default_factory=list)  # per step, when recorded


@dataclass
class BatchResult:
    sequences: list[SequenceResult]
    batch_gear: int
    ttft_s: float = 0.0  # prefill until every row has its first token
    decode_s: float = 0.0
    steps: int = 0  # decode calls after the first token

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.decode_s / self.steps if self.steps else float("nan")


class _Row:
    """One sequence's sampler and stop-string state, as ``Chat.ask`` keeps them."""

    def __init__(self, cfg: GenerationConfig, eos: tuple[int, ...], stops: tuple[str, ...], tokenizer,
                 prompt_tokens: int, record: bool):
        self.cfg, self.eos, self.record = cfg, eos, record
        self.sampler = Sampler(cfg, eos)
        self.detok, self.stop = tokenizer.stream(), StopText(stops)
        self.res = SequenceResult(prompt_tokens=prompt_tokens)
        self.done = False

    def take(self, logits: np.ndarray, cache_full: bool) -> int | None:
        """Choose the next token; return it if the row goes on, else None (finished)."""
        if self.record:
            self.res.logits.append(logits)
        token = self.sampler(logits)
        if self.cfg.stop_on_eos and token in self.eos:
            return self._finish("eos")
        self.res.tokens.append(token)
        self.stop.push(self.detok.push(token))
        if self.stop.stopped:
            return self._finish("stop")
        if len(self.res.tokens) >= self.cfg.max_new_tokens:
            return self._finish("length")
        if cache_full:
            return self._finish("cache_full")
        return token

    def _finish(self, reason: str) -> None:
        self.res.finish_reason, self.done = reason, True
        return None


class BatchGenerator:
    """Runs a pipeline's decoder sessions on several sequences at once."""

    def __init__(self, pipe):
        self.pipe, self.dec = pipe, pipe.decoder
        self.batches = self.dec.batch_gears

    def layout_ids(self, question: str, with_image: bool) -> list[list[int]]:
        """Token ids of a one-turn prompt's text segments (the image goes between them)."""
        pipe = self.pipe
        conv = Conversation(pipe.prompt)
        if with_image:
            conv.add_image()
        conv.ask(question)
        return tokenize_prompt(pipe.tokenizer, conv.segments(), pipe.prompt)

    def prompt(self, image_embeds: np.ndarray | None, question: str) -> np.ndarray:
        """A one-turn prompt's embeddings [n, H], laid out as ``Chat`` lays it out."""
        segments = self.layout_ids(question, image_embeds is not None)
        parts = []
        for i, ids in enumerate(segments):
            parts.append(self.dec.embed(ids))
            if i < len(segments) - 1:
                parts.append(image_embeds.astype(self.dec.embed_dtype))
        return np.concatenate(parts)

    def gear_for(self, n: int) -> int:
        fits = [b for b in self.batches if b >= n]
        if not fits:
            raise InputError(f"{n} sequences exceed the bundle's largest batch gear {self.batches[-1]}; "
                             "re-export with larger --batch-gears or pass fewer prompts")
        return fits[0]

    def generate(self, prompts: list[np.ndarray], config: GenerationConfig | list | None = None,
                 record_logits: bool = False) -> BatchResult:
        """Decode every prompt (embeddings [n_i, H]) until each row stops on its own;
        ``config`` is one for all rows or one per row."""
        if not prompts:
            raise InputError("no prompts to generate from")
        pipe, dec = self.pipe, self.dec
        configs = config if isinstance(config, (list, tuple)) else [config] * len(prompts)
        if len(configs) != len(prompts):
            raise InputError(f"{len(configs)} generation configs for {len(prompts)} prompts")
        gear = self.gear_for(len(prompts))
        rows = []
        for p, cfg in zip(prompts, configs):
            cfg = cfg or pipe.defaults
            stops = cfg.stop_strings if cfg.stop_strings is not None else tuple(pipe.prompt["stop_strings"])
            rows.append(_Row(cfg, pipe.eos_ids, stops, pipe.tokenizer, len(p), record_logits))
        cache = dec.new_cache(gear)
        longest = max(len(p) for p in prompts)
        if longest > cache.max_capacity:
            raise InputError(f"a prompt of {longest} positions exceeds the bundle's largest cache gear "
                             f"({cache.max_capacity}); shorten it or re-export with larger --cache-gears")
        t0 = time.perf_counter()
        logits = self._prefill(prompts, cache)
        live = list(range(len(rows)))  # cache row r holds sequence live[r]
        nxt = {i: rows[i].take(logits[i], cache.length + 1 > cache.max_capacity) for i in live}
        result = BatchResult([r.res for r in rows], gear, ttft_s=time.perf_counter() - t0)
        t1 = time.perf_counter()
        positions = [len(p) for p in prompts]
        while True:
            alive = [nxt[i] is not None for i in live]
            if not any(alive):
                break
            smaller = self.gear_for(sum(alive))
            if smaller < cache.batch:  # drop finished rows: one copy into the smaller batch gear
                keep = [r for r, a in enumerate(alive) if a]
                cache, live = cache.select_rows(keep, smaller), [live[r] for r in keep]
            step_logits = self._decode(cache, [nxt[i] for i in live], [positions[i] for i in live])
            result.steps += 1
            for r, i in enumerate(live):
                if nxt[i] is not None:
                    positions[i] += 1
                    nxt[i] = rows[i].take(step_logits[r], cache.length + 1 > cache.max_capacity)
        result.decode_s = time.perf_counter() - t1
        for row in rows:
            row.stop.flush()
            row.res.text = clean_answer(row.stop.text, pipe.prompt)
        return result

    def _prefill(self, prompts: list[np.ndarray], cache) -> np.ndarray:
        """Every prompt into its cache row; the logits [len(prompts), V] after each one's last token."""
        dec, lengths = self.dec, [len(p) for p in prompts]
        longest = max(lengths)
        cache.reserve(longest)
        out = np.zeros((len(prompts), 0), np.float32)
        start = 0
        for size in dec.chunks(longest, cache):
            s = dec.gear(cache, size)["seq"]
            hidden = np.zeros((cache.batch, s, dec.hidden), dec.embed_dtype)
            valid = np.zeros((cache.batch, size), np.float32)
            for i, p in enumerate(prompts):
                real = p[start:start + size]
                hidden[i, :len(real)] = real
                valid[i, :len(real)] = 1.0
            positions = np.broadcast_to(start + np.arange(s, dtype=np.int64), (cache.batch, s)).copy()
            ends = [i for i, n in enumerate(lengths) if start <= n - 1 < start + size]  # rows ending here
            index = np.zeros(cache.batch, np.int64)
            index[ends] = [lengths[i] - 1 - start for i in ends]
            logits, presents = dec.run_groups(hidden, positions, cache, index)
            cache.append(presents, size, valid)
            for i in ends:
                if out.shape[1] == 0:
                    out = np.zeros((len(prompts), logits.shape[-1]), np.float32)
                out[i] = logits[i]
            start += size
        return out

    def _decode(self, cache, tokens: list[int | None], positions: list[int]) -> np.ndarray:
        """One token per row (None: a finished row kept in the gear, masked out), all written
        to the same new slot; returns the logits [cache.batch, V]."""
        dec = self.dec
        cache.reserve(cache.length + 1)
        hidden = dec.embed_rows([[0 if t is None else t] for t in tokens], cache.batch)
        pos = np.zeros((cache.batch, 1), np.int64)
        pos[:len(positions), 0] = positions
        valid = np.zeros((cache.batch, 1), np.float32)
        valid[:len(tokens), 0] = [t is not None for t in tokens]
        assert dec.gear(cache, 1)["seq"] == 1, "the export requires a seq gear of 1"
        logits, presents = dec.run_groups(hidden, pos, cache, np.zeros(cache.batch, np.int64))
        cache.append(presents, 1, valid)
        return logits.astype(np.float32)


def generate_batch(pipe, images: list, questions: list[str], config: GenerationConfig | list | None = None,
                   record_logits: bool = False) -> BatchResult:
    """One question per image (``None``: text only), answered together on the batch gears."""
    if len(images) != len(questions):
        raise InputError(f"{len(images)} images but {len(questions)} questions: give one question per image")
    gen = BatchGenerator(pipe)
    prompts = [gen.prompt(None if im is None else pipe.encode_image(im), q) for im, q in zip(images, questions)]
    return gen.generate(prompts, config, record_logits)
