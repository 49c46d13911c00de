"""InternLM-XComposer2-4KHD's high-resolution images, torch-free: the ``hd_transform`` step, the
global view and crops, and the ``hd_grid`` layout of the views' embeddings.

``hd_transform`` is the original's ``HD_transform`` (``ixc_utils.py``) on a PIL image: a tall
image is transposed first, so the grid search and the resize always see a wide one; the largest
``scale`` with ``scale * ceil(scale / ratio) <= hd_num`` gives the width ``scale * size``; the
image is resized there (Pillow bilinear, as torchvision's ``resize`` on a PIL image), its height
padded with white to a multiple of ``size`` (centred, the extra row at the bottom), then
transposed back. The transposes are kept, not folded into the resize: Pillow resizes rows before
columns and rounds to 8 bits between the passes, so resizing the tall image directly gives other
pixels.

The views: the global view is the whole normalised tensor resized to ``size`` x ``size`` by
torch's bicubic ``interpolate`` (align_corners False, no antialias, a = -0.75; ``bicubic`` below
computes it in float32 as torch does), then the h x w crops, row-major.

``layout`` places each view's rows as the original's ``build_mlp.py`` does::

    global: t rows of (t tokens + row separator) | global separator | h*t rows of (w*t tokens + row separator)

so an image of h x w crops has (h*w + 1) * t^2 + 1 + (h + 1) * t rows (t = 12 at real size).
"""
from __future__ import annotations

import math

import numpy as np

from .errors import InputError

MAX_HD_NUM = 1584
"""Most crops asked for: 1584 views of 336 x 336 is just under ``preprocess.MAX_PIXELS``."""


def check_hd_num(hd_num: int) -> int:
    if not 1 <= hd_num <= MAX_HD_NUM:
        raise InputError(f"hd_num must be between 1 and {MAX_HD_NUM}, got {hd_num}")
    return hd_num


def hd_size(width: int, height: int, hd_num: int, size: int) -> tuple[int, int, int]:
    """(resized width, resized height, padded height) of the wide orientation, as HD_transform."""
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * size)
    new_h = int(new_w / ratio)
    return new_w, new_h, int(math.ceil(new_h / size) * size)


def hd_transform(img, hd_num: int, size: int, fill: tuple[int, ...], name: str = "the given image"):
    """PIL RGB image -> PIL image whose sides are multiples of ``size``, at most ``hd_num`` views."""
    from PIL import Image

    check_hd_num(hd_num)
    trans = img.size[0] < img.size[1]
    if trans:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    new_w, new_h, padded = hd_size(*img.size, hd_num, size)
    if new_h < 1:
        w, h = img.size
        raise InputError(f"{name} ({'x'.join(map(str, (h, w) if trans else (w, h)))}) is too elongated for "
                         f"hd_num {hd_num}: its short side would shrink to 0 pixels; crop it first")
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (new_w, padded), tuple(int(c) for c in fill))
    canvas.paste(img, (0, (padded - new_h) // 2))
    return canvas.transpose(Image.Transpose.TRANSPOSE) if trans else canvas


def _cubic_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices [n_out, 4] (clamped to the border) and weights [n_out, 4] of torch's
    bicubic kernel, with its float32 arithmetic."""
    a = np.float32(-0.75)
    scale = np.float32(n_in) / np.float32(n_out)
    real = scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    base = np.floor(real)
    t = (real - base).astype(np.float32)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1).astype(np.float32)
    index = np.clip(base.astype(np.int64)[:, None] + np.arange(-1, 3), 0, n_in - 1)
    return index, weights


def bicubic(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """[N, C, H, W] float32 -> [N, C, height, width]: ``F.interpolate(mode='bicubic')``."""
    x = np.asarray(x, np.float32)
    ix, wx = _cubic_taps(x.shape[-1], width)
    iy, wy = _cubic_taps(x.shape[-2], height)
    rows = np.einsum("nchok,ok->ncho", x[..., ix], wx, dtype=np.float32)  # along the width first
    return np.einsum("ncokw,ok->ncow", rows[..., iy, :], wy, dtype=np.float32)


def views(pixels: np.ndarray, size: int) -> tuple[list[np.ndarray], tuple[int, int]]:
    """[1, 3, H, W] (sides multiples of ``size``) -> ([global, crops row-major], (h, w))."""
    _, c, height, width = pixels.shape
    if height % size or width % size:
        raise InputError(f"the preprocessed image is {width}x{height}, not a grid of {size}-pixel views "
                         f"(the bundle's hd_transform step must come first)")
    h, w = height // size, width // size
    crops = pixels[0].reshape(c, h, size, w, size).transpose(1, 3, 0, 2, 4).reshape(h * w, c, size, size)
    return [bicubic(pixels, size, size), *(crops[i:i + 1] for i in range(h * w))], (h, w)


def layout(outputs: list[np.ndarray], grid: tuple[int, int], spec: dict) -> np.ndarray:
    """The views' graph outputs ([rows, hidden] each, global first) -> the image's rows [L, hidden]."""
    h, w = grid
    t = int(spec["tokens_per_side"])
    view = outputs[0]
    glb_sep, row_sep = view[spec["global_separator_row"]], view[spec["row_separator_row"]]
    tokens = np.stack([o[:t * t] for o in outputs])  # [1 + h*w, t*t, C]
    c = tokens.shape[-1]
    glb = np.concatenate([tokens[0].reshape(t, t, c), np.broadcast_to(row_sep, (t, 1, c))], axis=1)
    sub = tokens[1:].reshape(h, w, t, t, c).transpose(0, 2, 1, 3, 4).reshape(h * t, w * t, c)
    sub = np.concatenate([sub, np.broadcast_to(row_sep, (h * t, 1, c))], axis=1)
    return np.concatenate([glb.reshape(-1, c), glb_sep[None], sub.reshape(-1, c)])


def grid_of(size: tuple[int, int], hd_num: int, view: int) -> tuple[int, int]:
    """(h, w) crops ``hd_transform`` makes of a ``size`` = (width, height) image."""
    width, height = size
    trans = width < height
    new_w, _, padded = hd_size(*((height, width) if trans else (width, height)), hd_num, view)
    return (new_w // view, padded // view) if trans else (padded // view, new_w // view)


def rows(grid: tuple[int, int], tokens_per_side: int) -> int:
    """The image's row count for an h x w grid."""
    h, w = grid
    t = tokens_per_side
    return (h * w + 1) * t * t + 1 + (h + 1) * t
