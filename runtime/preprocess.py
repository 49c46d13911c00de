"""Image preprocessing in numpy + Pillow, as a list of steps the manifest declares.

MiniGPT-4's ``Blip2ImageEvalProcessor`` is ``[rgb, resize 224x224 bicubic, to float / 255,
normalize CLIP mean/std]``; torchvision's Resize on a PIL image is Pillow's own resize, so
this is bit-for-bit the same resampling.

LLaVA-1.5 (``image_aspect_ratio='pad'``) is ``[rgb, pad_to_square fill=int(mean*255),
resize_shortest 336 bicubic, center_crop 336, to_float, normalize]``: its ``expand2square``
followed by the PIL-based ``CLIPImageProcessor`` (Pillow resize on uint8, then crop, rescale,
normalize), reproduced step by step here.
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
        elif op == "pad_to_square":
            img = pad_to_square(img, tuple(int(c) for c in step["fill"]))
        elif op == "resize_shortest":
            w, h = shortest_edge_size(img.size, int(step["size"]))
            img = img.resize((w, h), getattr(Image.Resampling, _RESAMPLE[step["interpolation"]]))
        elif op == "center_crop":
            img = center_crop(img, step["size"])
        elif op == "to_float":
            arr = np.asarray(img, dtype=np.float32) / np.float32(step.get("divisor", 255.0))
        elif op == "normalize":
            mean = np.asarray(step["mean"], np.float32)
            std = np.asarray(step["std"], np.float32)
            arr = (arr - mean) / std
        else:
            raise InputError(f"preprocessing step '{op}' is not known to this runtime")
    return np.ascontiguousarray(arr.transpose(2, 0, 1)[None])


def pad_to_square(img, fill: tuple[int, ...]):
    """LLaVA's ``expand2square``: paste centred (offsets floored) on a max(w, h) square of ``fill``."""
    from PIL import Image

    w, h = img.size
    if w == h:
        return img
    if img.mode != "RGB":  # LLaVA loads images as RGB before padding
        img = img.convert("RGB")
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def shortest_edge_size(size: tuple[int, int], short: int) -> tuple[int, int]:
    """(w, h) with the shorter side at ``short`` and the longer one ``int(short * long / short_in)``
    (truncated, as transformers' ``get_resize_output_image_size`` with default_to_square=False)."""
    w, h = size
    if w <= h:
        return short, int(short * h / w)
    return int(short * w / h), short


def center_crop(img, size):
    """[w, h] crop at ``((W - w) // 2, (H - h) // 2)``; a side smaller than the crop is padded with
    zeros around the image (Pillow's crop outside the image), as transformers' ``center_crop``."""
    cw, ch = (size, size) if isinstance(size, int) else size
    w, h = img.size
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))
