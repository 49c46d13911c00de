"""Image preprocessing in numpy + Pillow, as a list of steps the manifest declares.

MiniGPT-4's ``Blip2ImageEvalProcessor`` is ``[rgb, resize 224x224 bicubic, to float / 255,
normalize CLIP mean/std]``; torchvision's Resize on a PIL image is Pillow's own resize, so
this is bit-for-bit the same resampling.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError

_RESAMPLE = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST"}


def load_image(image):
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image
    path = Path(image)
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise InputError(f"image '{path}' does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"cannot read image '{path}': {e}") from None


def preprocess(image, steps: list[dict]) -> np.ndarray:
    """PIL image or path -> float32 [1, 3, H, W] following the manifest's steps."""
    from PIL import Image

    img = load_image(image)
    arr = None
    for step in steps:
        op = step["op"]
        if op == "rgb":
            img = img.convert("RGB")
        elif op == "resize":
            w, h = step["size"]
            img = img.resize((w, h), getattr(Image.Resampling, _RESAMPLE[step["interpolation"]]))
        elif op == "to_float":
            arr = np.asarray(img, dtype=np.float32) / np.float32(step.get("divisor", 255.0))
        elif op == "normalize":
            mean = np.asarray(step["mean"], np.float32)
            std = np.asarray(step["std"], np.float32)
            arr = (arr - mean) / std
        else:
            raise InputError(f"preprocessing step '{op}' is not known to this runtime")
    return np.ascontiguousarray(arr.transpose(2, 0, 1)[None])
