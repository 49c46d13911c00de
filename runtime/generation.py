"""Next-token choice (greedy, temperature, top-k, top-p, repetition penalty) and stop strings;
the beam search options, whose loop is runtime/beam.py.

The processors run in transformers' order: repetition penalty, then temperature, top-k and
top-p. As in transformers' ``generate(inputs_embeds=...)``, the penalty sees only the
tokens generated so far (the prompt is embeddings, not ids).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .errors import BundleError, InputError


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 300
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_on_eos: bool = True
    stop_strings: tuple[str, ...] | None = None  # None: the bundle's own
    # Prompt and answer positions together at most (ChatGLM's ``max_length``); None: no such cap.
    max_length: int | None = None
    # ChatGLM's InvalidScoreLogitsProcessor: logits holding a NaN or an inf become zeros with 5e4 at
    # this id (the model chooses it) before anything else; None: no guard.
    invalid_score_token: int | None = None
    # Beam search (runtime/beam.py), greedy only, on the bundle's batch gears: as transformers'
    # generate(num_beams=..., length_penalty=..., early_stopping=...); 1: no beam search.
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise InputError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if not np.isfinite(value) or abs(value) < np.finfo(np.float64).tiny:  # nan, inf, denormal
                raise InputError(f"{name} must be a finite, normal number, got {value}")
        if self.seed is not None and self.seed < 0:
            raise InputError(f"seed must be >= 0, got {self.seed}")
        if self.max_length is not None and self.max_length < 2:
            raise InputError(f"max_length must be >= 2, got {self.max_length}")
        if self.invalid_score_token is not None and self.invalid_score_token < 0:
            raise InputError(f"invalid_score_token must be a token id >= 0, got {self.invalid_score_token}")
        if not isinstance(self.num_beams, int) or isinstance(self.num_beams, bool) or self.num_beams < 1:
            raise InputError(f"num_beams must be an integer >= 1 (1: no beam search), got {self.num_beams!r}")
        if self.num_beams > 1 and self.do_sample:
            raise InputError(f"num_beams={self.num_beams} with do_sample=True (beam sampling) is not offered: "
                             "only greedy beam search is; set do_sample=False, or num_beams=1 to sample")
        if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, (int, float)) \
                or not np.isfinite(self.length_penalty):
            raise InputError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if not isinstance(self.early_stopping, bool):
            raise InputError(f"early_stopping must be True or False, got {self.early_stopping!r} (transformers' "
                             "'never' is not offered)")

    @classmethod
    def from_manifest(cls, entry: dict, **overrides) -> "GenerationConfig":
        """The manifest's ``generation`` entry, then ``overrides`` (None: not given). A bad value in
        the entry is the bundle's fault and is named as such, not as the user's option."""
        known = {k: v for k, v in entry.items() if k in cls.__dataclass_fields__}
        try:
            if known.get("stop_strings") is not None:
                known["stop_strings"] = tuple(known["stop_strings"])
            base = cls(**known)
        except (InputError, TypeError) as e:
            raise BundleError(f"the manifest's generation entry cannot be used: {e}") from None
        return base.but(**overrides)

    def but(self, **changes) -> "GenerationConfig":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class Sampler:
    config: GenerationConfig
    eos_ids: tuple[int, ...]
    generated: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.config.seed)

    def __call__(self, logits: np.ndarray) -> int:
        cfg, scores = self.config, logits.astype(np.float64, copy=True)
        if cfg.invalid_score_token is not None and not np.isfinite(scores).all():
            scores[:] = 0.0
            scores[cfg.invalid_score_token] = 5e4
        if len(self.generated) < cfg.min_new_tokens:
            scores[list(self.eos_ids)] = -np.inf
        if cfg.repetition_penalty != 1.0 and self.generated:
            ids = np.unique(self.generated)
            s = scores[ids]
            scores[ids] = np.where(s < 0, s * cfg.repetition_penalty, s / cfg.repetition_penalty)
        if not cfg.do_sample:
            token = int(np.argmax(scores))
        else:
            scaled = scores / cfg.temperature
            if np.isposinf(scaled).any():  # a tiny temperature: the same distribution, shifted first
                scaled = (scores - scores.max()) / cfg.temperature
            token = self._sample(scaled)
        self.generated.append(token)
        return token

    def _sample(self, scores: np.ndarray) -> int:
        cfg = self.config
        if cfg.top_k and cfg.top_k < len(scores):
            kth = np.partition(scores, -cfg.top_k)[-cfg.top_k]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        if cfg.top_p < 1.0:
            order = np.argsort(probs)  # ascending, as transformers' TopPLogitsWarper
            cum = np.cumsum(probs[order])
            drop = cum <= 1 - cfg.top_p
            drop[-1] = False
            probs[order[drop]] = 0.0
            probs /= probs.sum()
        return int(self.rng.choice(len(probs), p=probs))


class StopText:
    """Streams text, holding back any tail that could start a stop string."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, piece: str) -> str:
        start = len(self.text)
        self.text += piece
        for s in self.stops:  # only where the new piece could complete a stop string
            at = self.text.find(s, max(0, start - len(s) + 1))
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        hold = 0 if self.stopped else self._partial_tail()
        out = self.text[self.emitted:len(self.text) - hold]
        self.emitted += len(out)
        return out

    def _partial_tail(self) -> int:
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    best = max(best, k)
                    break
        return best

    def flush(self) -> str:
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out
