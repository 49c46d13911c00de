"""The pipeline a bundle's task asks for, opened from its manifest.

``chat`` (every family today): image graphs -> splice -> KV-cache decoder. What differs between
families (preprocessing steps, which graphs encode an image and which tensors pass between
them, the prompt kind, stop strings, the decoder's inputs by role) is data in the manifest,
not code here.
"""
from __future__ import annotations

import numpy as np

from .backends import open_session
from .chat import Chat, GenerationResult, check_fits
from .decoder import Decoder
from .decoding import Answer
from .errors import BundleError
from .generation import GenerationConfig
from .layout import PromptLayout
from .preprocess import preprocess
from .prompts import Conversation
from .tokenizer import SentencePieceTokenizer


class VisionChatPipeline:
    def __init__(self, bundle, backend: str = "ort", exif_transpose: bool = True, **backend_options):
        """``exif_transpose``: turn photos upright by their EXIF orientation (False: as the original
        loaders do, which ignore it; verification against them uses False)."""
        self.bundle, self.exif_transpose = bundle, exif_transpose
        m = bundle.manifest
        pipe = m["pipeline"]
        self.image_graphs = list(pipe.get("image_graphs", []))
        names = [*self.image_graphs, pipe["embed_graph"], *pipe["decoder_graphs"]]
        self.sessions = {}
        try:
            for n in names:
                self.sessions[n] = open_session(backend, bundle, n, **backend_options)
            self.decoder = Decoder(bundle, self.sessions)
        except Exception:
            self.close()
            raise
        self.tokenizer = SentencePieceTokenizer.from_manifest(bundle)
        self.prompt = m["prompt"]
        self.eos_ids = tuple(m["tokenizer"]["eos_ids"])
        self.defaults = GenerationConfig.from_manifest(m["generation"])

    def conversation(self) -> Conversation:
        return Conversation(self.prompt)

    def stop_strings(self, cfg: GenerationConfig) -> tuple[str, ...]:
        return cfg.stop_strings if cfg.stop_strings is not None else tuple(self.prompt.get("stop_strings", ()))

    def encode_image(self, image) -> np.ndarray:
        """Image (path or PIL) -> embeddings [image tokens, hidden] through the image graphs.

        Tensors pass between the graphs by name: each graph is fed its inputs from what the
        preprocessing and the earlier graphs produced."""
        pipe = self.bundle.pipeline
        if not self.image_graphs:
            raise BundleError(f"bundle '{self.bundle.root}' has no image graphs: ask without an image")
        steps = self.bundle.manifest["preprocess"]["steps"]
        tensors = {pipe["image_input"]: preprocess(image, steps, exif_transpose=self.exif_transpose)}
        for name in self.image_graphs:
            sess = self.sessions[name]
            tensors.update(sess.run({s.name: tensors[s.name].astype(s.dtype) for s in sess.inputs}))
        return tensors[pipe["image_output"]][0]

    def chat(self, image=None) -> Chat:
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


PIPELINES = {"chat": VisionChatPipeline}


def check_prompt(bundle, question: str, images: int = 1) -> None:
    """Refuse a question that fits no cache gear, from the manifest and the tokenizer alone (no
    graph loaded): what a chat's first turn about ``images`` images would find only after every
    graph has loaded. Where the image's row count is not recorded, its text alone is checked."""
    m = bundle.manifest
    conv = Conversation(m["prompt"])
    for _ in range(images):
        conv.add_image()
    conv.ask(question)
    rows = m["pipeline"].get("image_tokens")
    layout = PromptLayout(conv.tokenize(SentencePieceTokenizer.from_manifest(bundle)), [rows or 0] * images)
    check_fits(layout, max(m["kv_cache"]["capacity_gears"]), images_known=rows is not None or not images)


def open_pipeline(bundle, backend: str = "ort", **backend_options):
    """The pipeline of the bundle's task."""
    task = bundle.task
    if task not in PIPELINES:
        raise BundleError(f"bundle '{bundle.root}' has task '{task}', which this runtime cannot run "
                          f"(it runs: {', '.join(PIPELINES)}); upgrade vlm2om")
    return PIPELINES[task](bundle, backend, **backend_options)


__all__ = ["Answer", "Chat", "GenerationResult", "PIPELINES", "VisionChatPipeline", "check_prompt", "open_pipeline"]
