"""Run a vlm2om bundle: sessions, preprocessing, tokenizer, prompts and the KV-cache decoder.

This package never imports torch: a deploy box has numpy, Pillow, sentencepiece and one
session backend (onnxruntime, or ais_bench on an Ascend NPU)::

    from vlm2om import open_bundle
    pipe = open_bundle("build/minigpt4")
    chat = pipe.chat(image="cat.jpg")
    for piece in chat.ask("What is in the picture?"):
        print(piece, end="", flush=True)
"""
from __future__ import annotations

from .bundle import Bundle
from .errors import BundleError, InputError, Vlm2omError
from .generation import GenerationConfig


def open_bundle(path, backend: str = "ort", verify_hashes: bool = True, **backend_options):
    """Open a bundle directory and return the pipeline its task asks for (a chat pipeline today)."""
    from .pipeline import open_pipeline

    return open_pipeline(Bundle.open(path, verify_hashes=verify_hashes), backend, **backend_options)


__all__ = ["Bundle", "BundleError", "GenerationConfig", "InputError", "Vlm2omError", "open_bundle"]
