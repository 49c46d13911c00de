"""Image loading and preprocessing in numpy + Pillow, as a list of steps the manifest declares.

MiniGPT-4's ``Blip2ImageEvalProcessor`` is ``[rgb, resize 224x224 bicubic, to float / 255,
normalize CLIP mean/std]``; torchvision's Resize on a PIL image is Pillow's own resize, so
this is bit-for-bit the same resampling.

LLaVA-1.5 (``image_aspect_ratio='pad'``) is ``[rgb, pad_to_square fill=int(mean*255),
resize_shortest 336 bicubic, center_crop 336, to_float, normalize]``: its ``expand2square``
followed by the PIL-based ``CLIPImageProcessor`` (Pillow resize on uint8, then crop, rescale,
normalize), reproduced step by step here.

Loading differs from the original loaders in three ways, each so that a file reaches the model
as a person sees it, or is refused in one line:

- EXIF orientation is applied (``exif_transpose=True``, the default): a phone photo stored
  sideways with an orientation tag is turned upright. MiniGPT-4's and LLaVA's own loaders
  (``Image.open(path).convert('RGB')``) do not apply it; ``exif_transpose=False`` reproduces them
  exactly, for verification against them.
- 16-bit grayscale (Pillow modes ``I;16``, ``I;16B``, ``I;16L``, and ``I``, which Pillow opens
  16-bit PGM files into) keeps its high byte (``value >> 8``; ``I`` is clipped to 0..65535 first)
  instead of Pillow's ``convert`` clipping every value above 255 to white. ``>> 8`` is what
  Pillow itself does when it opens 16-bit RGB(A) PNG or TIFF files as 8-bit ``RGB(A)``, so a
  16-bit gray file and the same picture as 16-bit colour give the same pixels. 32-bit float
  images (mode ``F``) have no agreed range and are refused.
- Work is bounded: an image over ``MAX_PIXELS`` is refused from its header, before any pixel is
  decoded; ``pad_to_square`` never builds a canvas larger than the later resize needs (see
  ``PAD_MAX_SIDE``); ``resize_shortest`` refuses to make more than ``MAX_PIXELS`` pixels.

URLs are not read: download the file first.
"""
from __future__ import annotations

import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np

from .errors import InputError

_RESAMPLE = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST"}

MAX_PIXELS = 178_956_970
"""Largest image read, width x height: Pillow's own decompression-bomb error limit (twice its
default ``Image.MAX_IMAGE_PIXELS``), 0.72 GB once decoded as RGB (Pillow keeps 4 bytes a pixel).
Checked on the header's size, before decoding; also the most pixels ``resize_shortest`` and
``pad_to_square`` may produce."""

PAD_MAX_SIDE = 4096
"""Largest square ``pad_to_square`` builds (or the later resize's size, if that is larger), 64 MiB
as Pillow RGB. An image whose longer side is at most this (a 12 MP phone photo, 4032x3024, is) is
padded exactly as LLaVA's ``expand2square``; a longer one is first resized (bicubic, aspect kept)
so its longer side is this, then padded: the same result up to resampling noise, since the later
resize shrinks the square to a few hundred pixels anyway. A 20000x100 panorama would need 1.6 GB."""

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # 'https://x' (str) or 'https:/x' (Path-mangled)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def load_image(image, *, exif_transpose: bool = True):
    """Path or PIL image -> PIL image with 8-bit channels, EXIF-upright unless ``exif_transpose`` is
    False; every failure is an ``InputError`` naming the file."""
    from PIL import Image

    if isinstance(image, Image.Image):
        name = _name(image)
        check_pixels(image.size, name)
        if exif_transpose:
            image = _upright(image, name, copy=False)
        return to_8bit(image, name)
    path = local_path(image)
    img = to_8bit(_decode(path, exif_transpose), f"image '{path}'")
    img.filename = str(path)  # as Pillow's opened files have it: later messages name the file
    return img


def local_path(image) -> Path:
    """The path of an existing regular, non-empty file, or an ``InputError`` saying what it is."""
    if not isinstance(image, (str, os.PathLike)):
        raise InputError(f"an image is a file path or a PIL image, not {type(image).__name__}")
    text = os.fsdecode(os.fspath(image))
    path = Path(text)
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        if _URL.match(text):
            raise InputError(_url_message(text)) from None
        raise InputError(f"image '{path}' does not exist") from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read image '{text}': {_reason(e)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"cannot read image '{path}': it is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"cannot read image '{path}': it is not a regular file (a pipe or a device?): "
                         f"save it to a file first")
    if st.st_size == 0:
        raise InputError(f"cannot read image '{path}': the file is empty (0 bytes)")
    return path


def _url_message(text: str) -> str:
    if text.lower().startswith("file:"):
        from urllib.parse import unquote, urlsplit

        local = unquote(urlsplit(text).path)
        return f"image '{text}' is a URL, and URLs are not read: pass the file's path ('{local}') instead"
    return f"image '{text}' is a URL, and URLs are not read: download the file first and pass its path"


def _reason(e: BaseException) -> str:
    """The first line of an exception's message (OSError's strerror without the repeated path)."""
    text = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__
    return text.strip().splitlines()[0]


def check_pixels(size: tuple[int, int], name: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise InputError(f"{name} has no pixels ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise InputError(f"{name} is {w}x{h} = {w * h:,} pixels, above the limit of {MAX_PIXELS:,} "
                         f"(MAX_PIXELS): downscale it first")


def check_image(image) -> tuple[int, int]:
    """(width, height) of a readable image within ``MAX_PIXELS``, from its header alone: a check
    of milliseconds, to run before a bundle is opened (a damaged body is found when decoding)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        check_pixels(image.size, _name(image))
        return image.size
    with _open(local_path(image)) as im:
        return im.size


def _open(path: Path):
    """The file opened by Pillow (header only, no pixels decoded) and its size checked."""
    from PIL import Image, UnidentifiedImageError

    name = f"image '{path}'"
    try:
        with warnings.catch_warnings():  # Pillow warns above half of MAX_PIXELS; check_pixels decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as e:
        raise InputError(_bomb_message(name, e)) from None
    except UnidentifiedImageError:
        raise InputError(f"cannot read {name}: not in an image format Pillow can read "
                         f"(PNG, JPEG, WebP, GIF, BMP, TIFF, ...)") from None
    except OSError as e:
        if e.errno is None:  # a decoder's complaint, not the system's
            raise InputError(f"cannot read {name}: the file is damaged or truncated ({_reason(e)})") from None
        raise InputError(f"cannot read {name}: {_reason(e)}") from None
    except MemoryError:
        raise
    except Exception as e:  # any other failure of a plugin reading a header means a bad file
        raise InputError(f"cannot read {name}: the file is damaged or truncated ({_reason(e)})") from None
    try:
        check_pixels(im.size, name)
    except InputError:
        im.close()
        raise
    return im


def _decode(path: Path, exif_transpose: bool):
    """Open (header only), check the size, then decode and detach from the file. Pillow's warnings
    on a damaged file are dropped when it is refused, and name the file when it is read."""
    from PIL import Image

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = _decode_file(path, exif_transpose)
    for message in dict.fromkeys(str(w.message) for w in caught
                                 if not issubclass(w.category, Image.DecompressionBombWarning)):
        warnings.warn(f"image '{path}': {' '.join(message.split())}", UserWarning, stacklevel=3)
    return img


def _decode_file(path: Path, exif_transpose: bool):
    from PIL import Image

    name = f"image '{path}'"
    with _open(path) as im:
        try:
            im.load()
        except Image.DecompressionBombError as e:
            raise InputError(_bomb_message(name, e)) from None
        except MemoryError:
            raise
        except Exception as e:  # any decoder failure on a user's file means a bad file
            raise InputError(f"cannot read {name}: the file is damaged or truncated "
                             f"({im.format}: {_reason(e)})") from None
        return _upright(im, name, copy=True) if exif_transpose else im.copy()


def _name(image) -> str:
    """How messages name an image: its path, or the file a PIL image was opened from."""
    filename = getattr(image, "filename", None) if not isinstance(image, (str, os.PathLike)) else image
    return f"image '{os.fsdecode(os.fspath(filename))}'" if filename else "the given image"


def _bomb_message(name: str, e: Exception) -> str:
    """Pillow's own refusal (raised inside ``Image.open``, at the same limit by default) in our words."""
    found = re.search(r"\((\d+) pixels\) exceeds limit of (\d+) pixels", str(e))
    if not found:
        return f"{name} has more pixels than Pillow reads (a decompression bomb?): downscale it first"
    count, limit = (int(g) for g in found.groups())
    return (f"{name} has {count:,} pixels, above the limit of {limit:,} (Pillow's decompression-bomb "
            f"limit): downscale it first")


def _upright(img, name: str, copy: bool):
    """The image turned as its EXIF orientation tag says (a copy; ``img`` itself when none applies
    and ``copy`` is False)."""
    from PIL import ExifTags, ImageOps

    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception as e:  # a damaged EXIF block
        raise InputError(f"{name} has damaged EXIF data ({_reason(e)}): "
                         f"read it without EXIF orientation (exif_transpose=False)") from None
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(img)
    return img.copy() if copy else img


def to_8bit(img, name: str):
    """16-bit grayscale -> 8-bit ``L`` by its high byte; ``F`` refused; other modes unchanged."""
    from PIL import Image

    if img.mode in _SIXTEEN_BIT:
        a = np.asarray(img)
        if img.mode == "I":
            a = np.clip(a, 0, 65535)
        return Image.fromarray((a >> 8).astype(np.uint8))
    if img.mode == "F":
        raise InputError(f"{name} has 32-bit float pixels (mode F), whose range is not known: "
                         f"save it as an 8- or 16-bit PNG first")
    return img


def to_rgb(img, name: str):
    """``img.convert("RGB")`` as the original loaders call it, quietly: a palette image whose
    transparency Pillow keeps as bytes makes it warn (the transparency is dropped either way)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Palette images with Transparency", UserWarning)
        try:
            return img.convert("RGB")
        except ValueError as e:
            raise InputError(f"{name} (mode {img.mode}) cannot be made RGB: {_reason(e)}") from None


def preprocess(image, steps: list[dict], *, exif_transpose: bool = True, hd_num: int | None = None) -> np.ndarray:
    """PIL image or path -> float32 [1, 3, H, W] following the manifest's steps. ``hd_num``: the
    most views an ``hd_transform`` step makes, instead of the bundle's (None: the bundle's)."""
    from PIL import Image

    from .hd_grid import hd_transform

    img = load_image(image, exif_transpose=exif_transpose)
    name = _name(image)
    arr = None
    for i, step in enumerate(steps):
        op = step["op"]
        if op == "rgb":
            img = to_rgb(img, name)
        elif op == "resize":
            w, h = step["size"]
            img = img.resize((w, h), getattr(Image.Resampling, _RESAMPLE[step["interpolation"]]))
        elif op == "pad_to_square":
            later = _later_resize(steps[i + 1:])
            img = pad_to_square(img, tuple(int(c) for c in step["fill"]),
                                max_side=None if later is None else max(PAD_MAX_SIDE, later), name=name)
        elif op == "resize_shortest":
            w, h = shortest_edge_size(img.size, int(step["size"]))
            if w * h > MAX_PIXELS:
                raise InputError(f"{name} ({img.size[0]}x{img.size[1]}) is too elongated: resizing its "
                                 f"shorter side to {step['size']} makes {w}x{h} pixels, more than "
                                 f"{MAX_PIXELS:,} (MAX_PIXELS): crop it first")
            img = img.resize((w, h), getattr(Image.Resampling, _RESAMPLE[step["interpolation"]]))
        elif op == "center_crop":
            img = center_crop(img, step["size"])
        elif op == "hd_transform":
            img = hd_transform(to_rgb(img, name), int(hd_num or step["hd_num"]), int(step["size"]),
                               tuple(step["fill"]), name)
        elif op == "to_float":
            arr = np.asarray(img, dtype=np.float32) / np.float32(step.get("divisor", 255.0))
        elif op == "normalize":
            mean = np.asarray(step["mean"], np.float32)
            std = np.asarray(step["std"], np.float32)
            arr = (arr - mean) / std
        else:
            raise InputError(f"preprocessing step '{op}' is not known to this runtime")
    return np.ascontiguousarray(arr.transpose(2, 0, 1)[None])


def _later_resize(steps: list[dict]) -> int | None:
    """The longest side the next resize step produces, or None when no resize follows."""
    for step in steps:
        if step["op"] == "resize":
            return max(int(s) for s in step["size"])
        if step["op"] == "resize_shortest":
            return int(step["size"])
    return None


def pad_to_square(img, fill: tuple[int, ...], max_side: int | None = PAD_MAX_SIDE,
                  name: str = "the given image"):
    """LLaVA's ``expand2square``: paste centred (offsets floored) on a max(w, h) square of ``fill``.

    A longer side above ``max_side`` is first resized to it (bicubic, aspect kept; see
    ``PAD_MAX_SIDE``). ``max_side`` None (no resize follows) keeps the size, up to ``MAX_PIXELS``."""
    from PIL import Image

    w, h = img.size
    if w == h:
        return img
    if img.mode != "RGB":  # LLaVA loads images as RGB before padding
        img = to_rgb(img, name)
    side = max(w, h)
    if max_side is not None and side > max_side:
        w, h = (max_side, max(1, round(h * max_side / w))) if w > h else (max(1, round(w * max_side / h)), max_side)
        img = img.resize((w, h), Image.Resampling.BICUBIC)
        side = max_side
    elif side * side > MAX_PIXELS:
        raise InputError(f"{name} ({w}x{h}) padded to a square would be {side}x{side} pixels, "
                         f"more than {MAX_PIXELS:,} (MAX_PIXELS): crop it first")
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
