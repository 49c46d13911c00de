"""The chat pipeline every family shares: image graphs -> splice -> KV-cache decoder.

What differs between families (preprocessing steps, which graphs encode an image, the
prompt template and BOS rule, stop strings) is data in the manifest, not code here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .backends import open_session
from .decoder import Decoder
from .errors import InputError
from .generation import GenerationConfig, Sampler, StopText
from .preprocess import preprocess
from .prompts import Conversation, clean_answer, tokenize_prompt
from .tokenizer import SentencePieceTokenizer


@dataclass
class Answer:
    """What every generated answer reports (a chat turn, or one sequence of a batch)."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0


@dataclass
class GenerationResult(Answer):
    reused_tokens: int = 0
    ttft_s: float = 0.0
    decode_s: float = 0.0

    @property
    def ms_per_token(self) -> float:
        steps = len(self.tokens) - 1
        return 1000 * self.decode_s / steps if steps > 0 else float("nan")


class VisionChatPipeline:
    def __init__(self, bundle, backend: str = "ort", **backend_options):
        self.bundle = bundle
        m = bundle.manifest
        pipe = m["pipeline"]
        names = [*pipe["image_graphs"], pipe["embed_graph"], *pipe["decoder_graphs"]]
        self.sessions = {n: open_session(backend, bundle, n, **backend_options) for n in names}
        self.decoder = Decoder(bundle, self.sessions)
        self.tokenizer = SentencePieceTokenizer.from_manifest(bundle)
        self.prompt = m["prompt"]
        self.eos_ids = tuple(m["tokenizer"]["eos_ids"])
        self.defaults = GenerationConfig.from_manifest(m["generation"])

    def encode_image(self, image) -> np.ndarray:
        """Image (path or PIL) -> embeddings [image_tokens, hidden] through the image graphs."""
        x = preprocess(image, self.bundle.manifest["preprocess"]["steps"])
        for name in self.bundle.pipeline["image_graphs"]:
            sess = self.sessions[name]
            spec = sess.inputs[0]
            x = sess.run({spec.name: x.astype(spec.dtype)})[sess.outputs[0].name]
        return x[0]

    def chat(self, image=None) -> "Chat":
        return Chat(self, image)

    def generate(self, image, prompt: str, config: GenerationConfig | None = None) -> str:
        """One question about one image; returns the cleaned answer."""
        chat = self.chat(image)
        for _ in chat.ask(prompt, config):
            pass
        return chat.last.text

    def close(self) -> None:
        for s in self.sessions.values():
            s.close()


class Chat:
    """A multi-turn conversation. Each turn re-renders the whole prompt exactly as the
    reference does, then reuses the longest cached prefix and prefills only the rest."""

    def __init__(self, pipe: VisionChatPipeline, image=None):
        self.pipe = pipe
        self.conv = Conversation(pipe.prompt)
        self.images: list[np.ndarray] = []
        self.cache = pipe.decoder.new_cache()
        self.cached_keys: list = []  # token id, or (image index, row), for every cache slot
        self.last = GenerationResult()
        self.image_s = 0.0
        if image is not None:
            self.add_image(image)

    def add_image(self, image) -> None:
        t0 = time.perf_counter()
        self.images.append(self.pipe.encode_image(image))
        self.image_s = time.perf_counter() - t0
        self.conv.add_image()

    def _layout(self) -> list:
        pipe = self.pipe
        segments = tokenize_prompt(pipe.tokenizer, self.conv.segments(), pipe.prompt)
        if len(segments) - 1 != len(self.images):
            raise InputError(f"the prompt has {len(segments) - 1} image placeholders "
                             f"but {len(self.images)} images were given")
        keys: list = []
        for i, ids in enumerate(segments):
            keys.extend(ids)
            if i < len(self.images):
                keys.extend((i, r) for r in range(len(self.images[i])))
        return keys

    def _embeds(self, keys: list) -> np.ndarray:
        ids = [k for k in keys if isinstance(k, int)]
        text = iter(self.pipe.decoder.embed(ids))
        return np.stack([next(text) if isinstance(k, int) else self.images[k[0]][k[1]] for k in keys])

    def ask(self, text: str, config: GenerationConfig | None = None) -> Iterator[str]:
        """Stream the answer to ``text``; ``self.last`` holds tokens, timings and finish reason."""
        pipe, cache = self.pipe, self.cache
        cfg = config or pipe.defaults
        stops = cfg.stop_strings if cfg.stop_strings is not None else tuple(pipe.prompt["stop_strings"])
        t0 = time.perf_counter()
        before = [list(m) for m in self.conv.messages]
        self.conv.ask(text)
        keys = self._layout()
        if len(keys) > cache.max_capacity:
            self.conv.messages = before  # the conversation stays usable
            n_img = sum(len(e) for e in self.images)
            raise InputError(f"the prompt is {len(keys)} tokens ({len(keys) - n_img} text + {n_img} image) "
                             f"but the bundle's largest cache gear holds {cache.max_capacity}; "
                             "shorten the conversation or re-export with larger --cache-gears")
        reuse = 0
        for a, b in zip(keys, self.cached_keys):
            if a != b:
                break
            reuse += 1
        reuse = min(reuse, len(keys) - 1)  # the last prompt position must run to give logits
        cache.truncate(reuse)
        logits = pipe.decoder.forward(self._embeds(keys[reuse:]), cache)
        self.cached_keys = keys
        res = self.last = GenerationResult(prompt_tokens=len(keys), reused_tokens=reuse)
        res.ttft_s = time.perf_counter() - t0
        sampler = Sampler(cfg, pipe.eos_ids)
        detok, stop = pipe.tokenizer.stream(), StopText(stops)
        t1, res.finish_reason = time.perf_counter(), "length"
        while True:
            token = sampler(logits)
            if cfg.stop_on_eos and token in pipe.eos_ids:
                res.finish_reason = "eos"
                break
            res.tokens.append(token)
            piece = stop.push(detok.push(token))
            if piece:
                yield piece
            if stop.stopped:
                res.finish_reason = "stop"
                break
            if len(res.tokens) >= cfg.max_new_tokens:
                break
            if cache.length + 1 > cache.max_capacity:
                res.finish_reason = "cache_full"
                break
            logits = pipe.decoder.forward(pipe.decoder.embed([token]), cache)
            self.cached_keys.append(token)
        res.decode_s = time.perf_counter() - t1
        tail = stop.flush()
        if tail:
            yield tail
        res.text = clean_answer(stop.text, pipe.prompt)
        self.conv.answer(res.text)
