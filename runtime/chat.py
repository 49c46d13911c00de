"""A multi-turn conversation on a chat pipeline.

Each turn re-renders the whole prompt exactly as the reference does (``layout.PromptLayout``);
where attention is causal the longest prefix the cache already holds is reused and only the rest
is prefilled, otherwise (prefix-LM) the turn is prefilled afresh. A turn that fails (a prompt
larger than the largest cache gear, say) leaves the conversation as it was before the turn.
With ``num_beams`` > 1 a turn is beam-searched on the bundle's batch gears (runtime/beam.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .beam import beam_gear, beam_search
from .decoding import Answer, Sequence, decode
from .errors import InputError
from .generation import GenerationConfig, StopText
from .layout import PromptLayout


@dataclass
class GenerationResult(Answer):
    reused_tokens: int = 0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    layout: PromptLayout | None = None  # the turn's prompt: text token ids and image rows

    @property
    def ms_per_token(self) -> float:
        steps = len(self.tokens) - 1
        return 1000 * self.decode_s / steps if steps > 0 else float("nan")


def check_fits(layout: PromptLayout, capacity: int, images_known: bool = True) -> None:
    """An InputError naming the prompt's length and the largest cache gear when it does not fit.
    ``images_known`` False: the layout counts no image rows (an encoder whose count varies), so
    the length is a lower bound."""
    if layout.length <= capacity:
        return
    text = layout.length - layout.image_positions
    size = (f"{layout.length} tokens ({text} text + {layout.image_positions} image)" if images_known else
            f"at least {text} tokens (its text alone)")
    raise InputError(f"the prompt is {size} but the bundle's largest cache gear holds {capacity}; "
                     "shorten the conversation or re-export with larger --cache-gears")


class Chat:
    def __init__(self, pipe, image=None):
        self.pipe = pipe
        self.conv = pipe.conversation()
        self.images: list[np.ndarray] = []
        self.cache = pipe.decoder.new_cache()
        self.cached_keys: list = []  # token id, or (image index, row), for every cache slot
        self.last = GenerationResult()
        self.image_s = 0.0
        if image is not None:
            self.add_image(image)
        self._start = [list(m) for m in self.conv.messages]

    def reset(self) -> None:
        """Start over about the same image: its embeddings are kept, and so is the cache, whose
        prefix the next question reuses where it still matches."""
        self.conv.messages = [list(m) for m in self._start]

    def add_image(self, image) -> None:
        t0 = time.perf_counter()
        self.images.append(self.pipe.encode_image(image))
        self.image_s = time.perf_counter() - t0
        self.conv.add_image()

    def _prefill(self, text: str) -> tuple[PromptLayout, int, np.ndarray]:
        """Add the question, lay the prompt out and prefill what the cache lacks; (layout, reused
        positions, next-token logits [V]). On error the conversation is left as it was."""
        before = [list(m) for m in self.conv.messages]
        self.conv.ask(text)
        try:
            layout = PromptLayout.of(self.conv, self.pipe.tokenizer, self.images)
            check_fits(layout, self.cache.max_capacity)
            keys, reuse = layout.keys, 0
            if self.pipe.decoder.reuses_prefix:
                for a, b in zip(keys, self.cached_keys):
                    if a != b:
                        break
                    reuse += 1
                reuse = min(reuse, len(keys) - 1)  # the last prompt position must run to give logits
            self.cache.truncate(reuse)
            self.cached_keys = keys[:reuse]
            logits = self.pipe.decoder.prefill([layout.embeds(self.pipe.decoder, self.images, reuse)], self.cache,
                                               [layout.image_mask(reuse)])
        except BaseException:
            self.conv.messages = before  # the conversation stays usable; the cache keeps what it holds
            self.cache.truncate(min(self.cache.length, len(self.cached_keys)))
            raise
        self.cached_keys = list(keys)
        return layout, reuse, logits

    def ask(self, text: str, config: GenerationConfig | None = None, record_logits: bool = False) -> Iterator[str]:
        """Stream the answer to ``text``; ``self.last`` holds tokens, timings and finish reason
        (and, with ``record_logits``, the next-token logits of every step). With ``num_beams`` > 1
        the answer is beam-searched (``_beams``) and comes whole at the end."""
        pipe = self.pipe
        cfg = config or pipe.defaults
        if cfg.num_beams > 1:
            beam_gear(pipe.decoder.batch_gears, cfg.num_beams)  # refused before the conversation changes
        t0 = time.perf_counter()
        layout, reuse, logits = self._prefill(text)
        res = self.last = GenerationResult(prompt_tokens=layout.length, reused_tokens=reuse, layout=layout,
                                           finish_reason="length")
        res.ttft_s = time.perf_counter() - t0
        if cfg.num_beams > 1:
            yield from self._beams(cfg, res, logits[0])
            return
        seq = Sequence(cfg, pipe.eos_ids, pipe.stop_strings(cfg), pipe.tokenizer, res, record_logits)
        t1 = time.perf_counter()
        for _, piece in decode(pipe.decoder, self.cache, [seq], logits, [layout.length]):
            yield piece
        res.decode_s = time.perf_counter() - t1
        tail = seq.close(self.conv.clean)
        if tail:
            yield tail
        self.cached_keys = (layout.keys + res.tokens)[:self.cache.length]
        self.conv.answer(res.text)

    def _beams(self, cfg: GenerationConfig, res: GenerationResult, logits: np.ndarray) -> Iterator[str]:
        """Beam search (runtime/beam.py) after the prefilled prompt; the whole answer comes at the
        end, as one piece (no beam is the answer until the search ends). The beams run in a copy
        of the cache at a batch gear, so this cache still holds just the prompt: the next turn
        reuses it and prefills the answer (the chosen beam's keys may have been overwritten by the
        time it is chosen, so they are not kept). No logits are recorded."""
        pipe = self.pipe
        t1 = time.perf_counter()
        best = beam_search(pipe.decoder, self.cache, logits, cfg, pipe.eos_ids, pipe.stop_strings(cfg), pipe.tokenizer)
        res.decode_s = time.perf_counter() - t1
        res.tokens, res.finish_reason = best.tokens, best.finish_reason
        detok, stop = pipe.tokenizer.stream(), StopText(pipe.stop_strings(cfg))
        for token in best.tokens:
            stop.push(detok.push(token))
        res.text = self.conv.clean(stop.text)
        self.cached_keys = res.layout.keys[:self.cache.length]
        self.conv.answer(res.text)
        if stop.text:
            yield stop.text

    def score(self, text: str, tokens: list[int]) -> tuple[PromptLayout, list[np.ndarray]]:
        """Teacher forcing: the next-token logits [V] before each of ``tokens`` as the answer to
        ``text`` (the last token is not fed). The conversation does not advance."""
        before = [list(m) for m in self.conv.messages]
        layout, _, logits = self._prefill(text)
        out, pos = [logits[0]], layout.length
        for token in tokens[:-1]:
            out.append(self.pipe.decoder.step(self.cache, [token], [pos])[0])
            pos += 1
        self.cached_keys = (layout.keys + list(tokens[:-1]))[:self.cache.length]
        self.conv.messages = before
        return layout, out
