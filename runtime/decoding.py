"""The one generation loop: chat turns and batches both decode through ``decode``.

Each sequence keeps its own sampler, incremental detokenizer and stop-string state
(``Sequence``); the loop samples every live row from its logits, stops a row on its own
(EOS, stop string, length, full cache), and runs one decode step for the rest. Row ``r`` of the
cache holds ``live[r]``; when the live rows fit a smaller batch gear, the cache moves there with
one copy. A chat turn is the same loop over one row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .generation import GenerationConfig, Sampler, StopText


@dataclass
class Answer:
    """What every generated answer reports (a chat turn, or one sequence of a batch)."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    logits: list[np.ndarray] = field(default_factory=list)  # next-token logits per step, when recorded


class Sequence:
    """One sequence's sampler and stop-string state."""

    def __init__(self, cfg: GenerationConfig, eos: tuple[int, ...], stops: tuple[str, ...], tokenizer,
                 answer: Answer, record: bool = False):
        self.cfg, self.eos, self.record, self.res = cfg, eos, record, answer
        self.sampler = Sampler(cfg, eos)
        self.detok, self.stop = tokenizer.stream(), StopText(stops)
        self.piece = ""  # text released by the last ``take``
        self.done = False

    def take(self, logits: np.ndarray, cache_full: bool) -> int | None:
        """Choose the next token; return it if the sequence goes on, else None (finished)."""
        self.piece = ""
        if self.record:
            self.res.logits.append(logits)
        token = self.sampler(logits)
        if self.cfg.stop_on_eos and token in self.eos:
            return self._finish("eos")
        self.res.tokens.append(token)
        self.piece = self.stop.push(self.detok.push(token))
        if self.stop.stopped:
            return self._finish("stop")
        if len(self.res.tokens) >= self.cfg.max_new_tokens:
            return self._finish("length")
        if self.cfg.max_length is not None and self.res.prompt_tokens + len(self.res.tokens) >= self.cfg.max_length:
            return self._finish("length")
        if cache_full:
            return self._finish("cache_full")
        return token

    def _finish(self, reason: str) -> None:
        self.res.finish_reason, self.done = reason, True
        return None

    def close(self, clean: Callable[[str], str]) -> str:
        """The held-back tail of the text; sets the answer's cleaned text."""
        tail = self.stop.flush()
        self.res.text = clean(self.stop.text)
        return tail


@dataclass
class Progress:
    steps: int = 0  # decode steps after the first token
    first_token_s: float = 0.0  # set by the caller's clock when every row has its first token


def decode(decoder, cache, seqs: list[Sequence], logits: np.ndarray, positions: list[int],
           gear_for: Callable[[int], int] | None = None, progress: Progress | None = None,
           clock: Callable[[], float] | None = None) -> Iterator[tuple[int, str]]:
    """Sample and step until every sequence stops; yield (sequence index, new text) as it comes.

    ``logits`` [len(seqs), V]: after each prompt; ``positions``: each sequence's next position.
    ``gear_for(n)``: the batch gear that holds n rows, to shrink the cache as rows finish (None:
    the cache keeps its batch)."""
    progress = progress or Progress()
    positions = list(positions)
    full = lambda: cache.length + 1 > cache.max_capacity  # noqa: E731
    live = list(range(len(seqs)))  # cache row r holds sequence live[r]
    nxt = {}
    for i in live:
        nxt[i] = seqs[i].take(logits[i], full())
        if seqs[i].piece:
            yield i, seqs[i].piece
    if clock:
        progress.first_token_s = clock()
    while True:
        alive = [nxt[i] is not None for i in live]
        if not any(alive):
            return
        if gear_for is not None and gear_for(sum(alive)) < cache.batch:  # one copy into the smaller gear
            keep = [r for r, a in enumerate(alive) if a]
            cache, live = cache.select_rows(keep, gear_for(sum(alive))), [live[r] for r in keep]
        step_logits = decoder.step(cache, [nxt[i] for i in live], [positions[i] for i in live])
        progress.steps += 1
        for r, i in enumerate(live):
            if nxt[i] is not None:
                positions[i] += 1
                nxt[i] = seqs[i].take(step_logits[r], full())
                if seqs[i].piece:
                    yield i, seqs[i].piece
