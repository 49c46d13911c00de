"""Beam search over a bundle's batch rows: transformers' ``generate(num_beams=n, do_sample=False)``.

Why a loop of its own: ``decoding.decode`` advances every row on its own, while beam search ranks
the continuations of all rows together and moves each row's cache to the beam it continues. The
beams live in the rows of one batch gear: the prompt, prefilled once on one row, is copied into
``num_beams`` rows, and every step runs the decoder once for all beams. Reordering rows copies
only the rows whose origin changed, in place.

The search follows transformers' ``_beam_search`` (reproduced, not copied), with the prompt as
embeddings (``generate(inputs_embeds=...)``), so the repetition penalty sees each beam's own
generated tokens only, as ``Sampler`` does:

* scores: log_softmax of the logits, then the processors in transformers' order (repetition
  penalty on the log-probs, min_new_tokens blocking EOS), plus the beam's running score; at the
  first step only beam 0 counts (the others start at -1e9);
* the best ``max(2, 1 + EOS ids) * num_beams`` candidates over beams x vocab; a candidate that
  ends (an EOS id, a stop string in its text, or the length limit) and ranks among the first
  ``num_beams`` joins the finished hypotheses with score sum_logprobs / length ** length_penalty
  (length counts the EOS), keeping the best ``num_beams``; an ending candidate ranked lower is
  dropped; the best candidates that go on are the next beams;
* the search stops at the length limit (every candidate then ends, so the best running beams
  are scored as finished hypotheses), once ``num_beams`` hypotheses finished with
  ``early_stopping``, or, without it, once ``num_beams`` finished and the best running score
  divided by the current length ** length_penalty is no better than the worst finished one;
* the answer is the best finished hypothesis.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .generation import GenerationConfig
from .kv_cache import KVCache

NEG = -1.0e9  # transformers' score for "not a candidate"


@dataclass
class Hypothesis:
    score: float
    tokens: list[int]  # the answer, without a final EOS
    finish_reason: str  # eos, stop, length or cache_full


def beam_gear(batch_gears: list[int], num_beams: int) -> int:
    """The smallest batch gear that holds ``num_beams`` rows; InputError naming the largest if none does."""
    fits = [b for b in batch_gears if b >= num_beams]
    if not fits:
        raise InputError(f"beam search with num_beams={num_beams} needs a batch gear of at least {num_beams} "
                         f"rows, but the bundle's largest batch gear is {max(batch_gears)}; lower num_beams or "
                         "re-export with larger --batch-gears")
    return fits[0]


def reorder_rows(cache: KVCache, origins: list[int]) -> None:
    """Row ``r`` of ``cache`` takes the keys, values, mask and prefix of row ``origins[r]``, in
    place. Only rows whose origin differs are written, from copies of their sources taken first,
    so a row that another reads is never overwritten before it is read (repeats are fine)."""
    moved = [r for r, o in enumerate(origins) if o != r]
    if not moved:
        return
    src, n = [origins[r] for r in moved], cache.length
    for key, a in cache.arrays.items():
        axis = KVCache._batch_axis(key)
        taken = np.take(a[..., :n, :], src, axis=axis)  # a copy
        index = [slice(None)] * a.ndim
        index[axis], index[-2] = moved, slice(0, n)
        a[tuple(index)] = taken
    cache.mask[moved, :n] = cache.mask[src, :n]
    cache.prefix[moved] = cache.prefix[src]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _limit(cfg: GenerationConfig, prompt: int, capacity: int) -> tuple[int, str]:
    """(the most tokens an answer may have, the finish reason when it reaches them)."""
    length = cfg.max_new_tokens if cfg.max_length is None else max(1, min(cfg.max_new_tokens, cfg.max_length - prompt))
    room = capacity - prompt + 1  # the last token needs no cache slot
    return (room, "cache_full") if room < length else (length, "length")


def beam_search(decoder, cache: KVCache, logits: np.ndarray, cfg: GenerationConfig, eos_ids: tuple[int, ...],
                stops: tuple[str, ...], tokenizer) -> Hypothesis:
    """The best hypothesis after the prompt that ``cache`` holds in row 0 (its next-token logits
    ``logits`` [V]). ``cache`` itself is left as it is: the beams run in a copy at a batch gear."""
    nb, prompt = cfg.num_beams, int(cache.length)
    gear = beam_gear(decoder.batch_gears, nb)
    eos = tuple(eos_ids) if cfg.stop_on_eos else ()
    stops = tuple(s for s in stops if s)
    keep = max(2, 1 + len(eos)) * nb
    limit, limit_reason = _limit(cfg, prompt, cache.max_capacity)
    beams = cache.select_rows([0] * nb, gear) if limit > 1 else None  # every row a copy of the prompt
    seqs: list[list[int]] = [[] for _ in range(nb)]
    running = np.full(nb, NEG)
    running[0] = 0.0
    step_logits = np.broadcast_to(logits, (nb, logits.shape[-1]))
    finished: list[Hypothesis] = []
    t = 0  # tokens in each candidate
    while True:
        t += 1
        scores = _log_softmax(step_logits)
        for b, seq in enumerate(seqs):
            if cfg.repetition_penalty != 1.0 and seq:
                ids = np.unique(seq)
                s = scores[b, ids]
                scores[b, ids] = np.where(s < 0, s * cfg.repetition_penalty, s / cfg.repetition_penalty)
        if t - 1 < cfg.min_new_tokens:
            scores[:, list(eos_ids)] = -np.inf  # as Sampler: the bundle's EOS ids
        total = (scores + running[:, None]).ravel()
        top = np.argpartition(-total, keep - 1)[:keep] if keep < total.size else np.arange(total.size)
        top = top[np.lexsort((top, -total[top]))]  # best first; a tie: the lower beam, then token
        vocab = scores.shape[-1]
        going, ended = [], []
        for rank, i in enumerate(top):
            b, token, score = int(i // vocab), int(i % vocab), float(total[i])
            reason = _ends(seqs[b], token, eos, stops, tokenizer) or (limit_reason if t >= limit else None)
            if reason is None:
                going.append((b, token, score))
                continue
            ended.append((b, token, score + NEG))
            if rank < nb:
                answer = seqs[b] if reason == "eos" else seqs[b] + [token]
                finished.append(Hypothesis(score / t ** cfg.length_penalty, answer, reason))
        finished = sorted(finished, key=lambda h: -h.score)[:nb]
        if not going:  # every candidate ended: the length limit (or nothing left to continue)
            break
        going = (going + ended)[:nb]  # too few go on: transformers continues ended ones at -1e9
        running = np.array([s for _, _, s in going])
        if len(finished) == nb and (cfg.early_stopping or running[0] / t ** cfg.length_penalty <= finished[-1].score):
            break
        reorder_rows(beams, [b for b, _, _ in going])
        seqs = [seqs[b] + [token] for b, token, _ in going]
        step_logits = decoder.step(beams, [s[-1] for s in seqs], [prompt + t - 1] * nb)[:nb]
    return finished[0]


def _ends(seq: list[int], token: int, eos: tuple[int, ...], stops: tuple[str, ...], tokenizer) -> str | None:
    """Why the beam ``seq`` continued by ``token`` ends (None: it goes on). A running beam's text
    holds no stop string, so one in the candidate's text was completed by ``token``."""
    if token in eos:
        return "eos"
    if stops:
        text = tokenizer.decode(seq + [token])
        if any(s in text for s in stops):
            return "stop"
    return None
