"""A prompt's layout, built in one place for chat turns, batches and the golden replay.

A rendered conversation is text segments with an image between each pair; its layout is the
token ids of every segment and the number of embedding rows of each image. ``keys`` names every
position (a token id, or ``(image index, row)``), which is how a chat finds the prefix its cache
already holds; ``embeds`` turns the layout into the decoder's input embeddings [n, H].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError


@dataclass(frozen=True)
class PromptLayout:
    segments: list[list[int]]  # token ids of the text before, between and after the images
    image_rows: list[int]  # embedding rows of each image, in order

    @classmethod
    def of(cls, conversation, tokenizer, images: list[np.ndarray]) -> "PromptLayout":
        segments = conversation.tokenize(tokenizer)
        if len(segments) - 1 != len(images):
            raise InputError(f"the prompt has {len(segments) - 1} image placeholders "
                             f"but {len(images)} images were given")
        return cls(segments, [len(e) for e in images])

    @property
    def keys(self) -> list:
        keys: list = []
        for i, ids in enumerate(self.segments):
            keys.extend(ids)
            if i < len(self.image_rows):
                keys.extend((i, r) for r in range(self.image_rows[i]))
        return keys

    @property
    def length(self) -> int:
        return sum(map(len, self.segments)) + sum(self.image_rows)

    @property
    def image_positions(self) -> int:
        return sum(self.image_rows)

    def image_mask(self, start: int = 0) -> np.ndarray:
        """1.0 on image positions, from position ``start`` on."""
        return np.array([0.0 if isinstance(k, int) else 1.0 for k in self.keys[start:]], np.float32)

    def embeds(self, decoder, images: list[np.ndarray], start: int = 0) -> np.ndarray:
        """Embeddings [length - start, H] of the positions from ``start`` on."""
        keys = self.keys[start:]
        text = iter(decoder.embed([k for k in keys if isinstance(k, int)]))
        rows = [next(text) if isinstance(k, int) else images[k[0]][k[1]].astype(decoder.embed_dtype) for k in keys]
        return np.stack(rows) if rows else np.zeros((0, decoder.hidden), decoder.embed_dtype)
