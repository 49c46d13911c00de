"""Test images and LLaVA's image padding, written from their definitions."""
from __future__ import annotations

import numpy as np
from PIL import Image

# OpenAI CLIP's normalisation, written out (not taken from the recipes it checks).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def llava_expand2square(img: Image.Image, background: tuple) -> Image.Image:
    """LLaVA's definition: square canvas of the longer side, image pasted centred (floored)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), background)
    canvas.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return canvas


def synthetic_image(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Gradients plus noise: smooth areas and sharp edges both reach the bicubic filter."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 64 * 4], -1)
    arr = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def llava_steps(size: int, pad: bool) -> list[dict]:
    """LLaVA-1.5's preprocessing as manifest steps: expand2square (optional), shortest side, crop, CLIP."""
    fill = [int(x * 255) for x in CLIP_MEAN]
    return [{"op": "rgb"}, *([{"op": "pad_to_square", "fill": fill}] if pad else []),
            {"op": "resize_shortest", "size": size, "interpolation": "bicubic"},
            {"op": "center_crop", "size": [size, size]},
            {"op": "to_float", "divisor": 255.0}, {"op": "normalize", "mean": CLIP_MEAN, "std": CLIP_STD}]
