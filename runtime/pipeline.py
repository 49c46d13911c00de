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
from . import hd_grid
from .errors import BundleError, InputError
from .generation import GenerationConfig
from .layout import PromptLayout
from .preprocess import preprocess
from .prompts import Conversation
from .tokenizer import SentencePieceTokenizer


class VisionChatPipeline:
    def __init__(self, bundle, backend: str = "ort", exif_transpose: bool = True, hd_num: int | None = None,
                 **backend_options):
        """``exif_transpose``: turn photos upright by their EXIF orientation (False: as the original
        loaders do, which ignore it; verification against them uses False). ``hd_num``: the most
        views an ``hd_transform`` bundle cuts an image into, instead of the manifest's."""
        self.bundle, self.exif_transpose = bundle, exif_transpose
        self.hd_num = check_hd_num(bundle, hd_num)
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
        preprocessing and the earlier graphs produced. With ``pipeline.image_assembly`` (kind
        ``hd_grid``) the image is cut into views, each runs the graphs, and the rows are laid out."""
        pipe = self.bundle.pipeline
        if not self.image_graphs:
            raise BundleError(f"bundle '{self.bundle.root}' has no image graphs: ask without an image")
        steps = self.bundle.manifest["preprocess"]["steps"]
        pixels = preprocess(image, steps, exif_transpose=self.exif_transpose, hd_num=self.hd_num)
        assembly = pipe.get("image_assembly")
        if assembly is None:
            return self._image_chain(pixels)[0]
        parts, grid = hd_grid.views(pixels, int(assembly["view_size"]))
        return hd_grid.layout(self._views(parts), grid, assembly)

    def _views(self, views: list[np.ndarray]) -> list[np.ndarray]:
        """Each view's rows [tokens, hidden], the views run together in batches the image graphs'
        gears allow: the largest the views left fill, so that no run is padded (unless even the
        smallest gear is more than what is left)."""
        gears = self.sessions[self.image_graphs[0]].gears or [{}]
        batches = sorted({g.get("batch", 1) for g in gears})
        out, i = [], 0
        while i < len(views):
            left = len(views) - i
            b = max((n for n in batches if n <= left), default=batches[0])
            chunk = np.concatenate(views[i:i + b])
            if len(chunk) < b:  # the smallest gear holds more views than are left: pad with zeros
                chunk = np.concatenate([chunk, np.zeros((b - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            out.extend(self._image_chain(chunk)[:min(b, left)])
            i += b
        return out

    def _image_chain(self, pixels: np.ndarray) -> np.ndarray:
        """The image graphs on ``pixels`` [B, 3, H, W] -> ``pipeline.image_output`` [B, tokens, hidden]."""
        pipe = self.bundle.pipeline
        tensors = {pipe["image_input"]: pixels}
        for name in self.image_graphs:
            sess = self.sessions[name]
            tensors.update(sess.run({s.name: tensors[s.name].astype(s.dtype) for s in sess.inputs}))
        return tensors[pipe["image_output"]]

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


def check_hd_num(bundle, hd_num: int | None) -> int | None:
    """``hd_num`` itself, refused where the bundle has no ``hd_transform`` step or out of range."""
    if hd_num is None:
        return None
    if not any(s.get("op") == "hd_transform" for s in bundle.manifest["preprocess"]["steps"]):
        raise InputError(f"--hd-num applies to bundles that cut images into views (an hd_transform "
                         f"preprocessing step); bundle '{bundle.root}' has none")
    return hd_grid.check_hd_num(hd_num)


def check_prompt(bundle, question: str, images: int = 1, image_sizes: list[tuple[int, int]] | None = None,
                 hd_num: int | None = None) -> None:
    """Refuse a question that fits no cache gear, from the manifest and the tokenizer alone (no
    graph loaded): what a chat's first turn about ``images`` images would find only after every
    graph has loaded. Where the image's row count is not recorded, it is counted from
    ``image_sizes`` ((width, height) from the header) for an ``hd_grid`` bundle, else its text
    alone is checked."""
    m = bundle.manifest
    conv = Conversation(m["prompt"])
    for _ in range(images):
        conv.add_image()
    conv.ask(question)
    rows = [m["pipeline"].get("image_tokens")] * images
    assembly = m["pipeline"].get("image_assembly")
    if rows and rows[0] is None and assembly and image_sizes and len(image_sizes) == images:
        step = next(s for s in m["preprocess"]["steps"] if s["op"] == "hd_transform")
        n, view = hd_num or step["hd_num"], assembly["view_size"]
        rows = [hd_grid.rows(hd_grid.grid_of(size, n, view), assembly["tokens_per_side"]) for size in image_sizes]
    layout = PromptLayout(conv.tokenize(SentencePieceTokenizer.from_manifest(bundle)), [r or 0 for r in rows])
    check_fits(layout, max(m["kv_cache"]["capacity_gears"]), images_known=None not in rows or not images)


def open_pipeline(bundle, backend: str = "ort", **backend_options):
    """The pipeline of the bundle's task."""
    task = bundle.task
    if task not in PIPELINES:
        raise BundleError(f"bundle '{bundle.root}' has task '{task}', which this runtime cannot run "
                          f"(it runs: {', '.join(PIPELINES)}); upgrade vlm2om")
    return PIPELINES[task](bundle, backend, **backend_options)


__all__ = ["Answer", "Chat", "GenerationResult", "PIPELINES", "VisionChatPipeline", "check_prompt", "open_pipeline"]
