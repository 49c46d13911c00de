"""Batched generation: several prompts (each with its image) decoded together on batch gears.

Row ``i`` of the KV cache holds sequence ``i``. The prompts are prefilled together
(``Decoder.prefill`` masks each shorter row's padding), then every decode step writes one slot
for all rows, with each row's own next position, so a row attends to exactly the keys a batch of
one would hold, only at other slots: each sequence gets the tokens a batch of one produces. The
loop is the chat's (``decoding.decode``); a row stops on its own, and once the live rows fit a
smaller batch gear the cache moves there with one copy.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .decoding import Answer, Progress, Sequence, decode
from .errors import InputError
from .generation import GenerationConfig
from .layout import PromptLayout


@dataclass
class BatchResult:
    sequences: list[Answer]
    batch_gear: int
    ttft_s: float = 0.0  # prefill until every row has its first token
    decode_s: float = 0.0
    steps: int = 0  # decode calls after the first token

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.decode_s / self.steps if self.steps else float("nan")


class BatchGenerator:
    """Runs a pipeline's decoder sessions on several sequences at once."""

    def __init__(self, pipe):
        self.pipe, self.dec = pipe, pipe.decoder
        self.batches = self.dec.batch_gears

    def layout(self, question: str, images: list[np.ndarray]) -> PromptLayout:
        """A one-turn prompt's layout, as ``Chat`` lays it out."""
        conv = self.pipe.conversation()
        for _ in images:
            conv.add_image()
        conv.ask(question)
        return PromptLayout.of(conv, self.pipe.tokenizer, images)

    def prompt(self, image_embeds: np.ndarray | None, question: str) -> np.ndarray:
        """A one-turn prompt's embeddings [n, H]."""
        images = [] if image_embeds is None else [image_embeds]
        return self.layout(question, images).embeds(self.dec, images)

    def gear_for(self, n: int) -> int:
        fits = [b for b in self.batches if b >= n]
        if not fits:
            raise InputError(f"{n} sequences exceed the bundle's largest batch gear {self.batches[-1]}; "
                             "re-export with larger --batch-gears or pass fewer prompts")
        return fits[0]

    def generate(self, prompts: list[np.ndarray], config: GenerationConfig | list | None = None,
                 record_logits: bool = False, image_masks: list[np.ndarray] | None = None) -> BatchResult:
        """Decode every prompt (embeddings [n_i, H]) until each row stops on its own;
        ``config`` is one for all rows or one per row; ``image_masks`` [n_i]: 1 on each prompt's
        image positions (``PromptLayout.image_mask``), for decoders that take an ``image_mask``."""
        if not prompts:
            raise InputError("no prompts to generate from")
        pipe = self.pipe
        configs = config if isinstance(config, (list, tuple)) else [config] * len(prompts)
        if len(configs) != len(prompts):
            raise InputError(f"{len(configs)} generation configs for {len(prompts)} prompts")
        gear = self.gear_for(len(prompts))
        seqs = []
        for p, cfg in zip(prompts, configs):
            cfg = cfg or pipe.defaults
            if cfg.num_beams > 1:
                raise InputError(f"num_beams={cfg.num_beams}: beam search answers one prompt at a time (its beams "
                                 "are the batch rows); ask each in a chat, or decode the batch without beams")
            seqs.append(Sequence(cfg, pipe.eos_ids, pipe.stop_strings(cfg), pipe.tokenizer,
                                 Answer(prompt_tokens=len(p)), record_logits))
        cache = self.dec.new_cache(gear)
        longest = max(len(p) for p in prompts)
        if longest > cache.max_capacity:
            raise InputError(f"a prompt of {longest} positions exceeds the bundle's largest cache gear "
                             f"({cache.max_capacity}); shorten it or re-export with larger --cache-gears")
        t0 = time.perf_counter()
        logits = self.dec.prefill(prompts, cache, image_masks)
        progress = Progress()
        for _ in decode(self.dec, cache, seqs, logits, [len(p) for p in prompts], self.gear_for, progress,
                        clock=time.perf_counter):
            pass
        end = time.perf_counter()
        result = BatchResult([s.res for s in seqs], gear, ttft_s=progress.first_token_s - t0,
                             decode_s=end - progress.first_token_s, steps=progress.steps)
        conv = pipe.conversation()
        for s in seqs:
            s.close(conv.clean)
        return result


def generate_batch(pipe, images: list, questions: list[str], config: GenerationConfig | list | None = None,
                   record_logits: bool = False) -> BatchResult:
    """One question per image (``None``: text only), answered together on the batch gears."""
    if len(images) != len(questions):
        raise InputError(f"{len(images)} images but {len(questions)} questions: give one question per image")
    gen = BatchGenerator(pipe)
    embeds = [[] if im is None else [pipe.encode_image(im)] for im in images]
    layouts = [gen.layout(q, e) for q, e in zip(questions, embeds)]
    return gen.generate([lay.embeds(gen.dec, e) for lay, e in zip(layouts, embeds)], config, record_logits,
                        [lay.image_mask() for lay in layouts])
