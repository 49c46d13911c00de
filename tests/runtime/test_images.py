"""Images a user may give: 16-bit files, EXIF-rotated photos, URLs, pixel bombs, a 20000x100
panorama, non-image bytes, truncated files and folders. Each reaches the model as a person sees it
or is refused with one line naming the file, and none costs a large allocation."""
from __future__ import annotations

import io
import json
import os
import random
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from tests.helpers import ROOT
from tests.helpers.images import llava_expand2square, synthetic_image
from tests.helpers.images import CLIP_MEAN, CLIP_STD, llava_steps
from vlm2om.runtime import preprocess as pre
from vlm2om.runtime.errors import InputError
from vlm2om.runtime.preprocess import check_image, load_image, preprocess

PIXELS = [{"op": "rgb"}, {"op": "to_float", "divisor": 1.0}]  # uint8 values as float, [1, 3, H, W]
MINIGPT4 = [{"op": "rgb"}, {"op": "resize", "size": [224, 224], "interpolation": "bicubic"},
            {"op": "to_float", "divisor": 255.0}, {"op": "normalize", "mean": CLIP_MEAN, "std": CLIP_STD}]
LLAVA = llava_steps(336, pad=True)


def png_bytes(w: int, h: int, depth: int, color: int, rows: bytes | None) -> bytes:
    """A PNG written from the specification; ``rows`` None: header only (no pixel data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    body = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0))
    body += chunk(b"IDAT", zlib.compress(rows)) if rows is not None else b""
    return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IEND", b"")


def refused(image, match: str, **kw) -> str:
    with pytest.raises(InputError, match=match) as e:
        preprocess(image, LLAVA, **kw)
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.fixture
def no_decode(monkeypatch):
    """Fails a test that decodes pixels: refusals must come from the header."""
    def load(self):
        raise AssertionError(f"pixels of a {self.size} image decoded before it was refused")
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def ramp16(w: int = 64, h: int = 48) -> np.ndarray:
    return (np.arange(w * h, dtype=np.uint32).reshape(h, w) * 65535 // (w * h - 1)).astype(np.uint16)


# --- 16-bit -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_gray_file_keeps_its_high_byte(tmp_path, fmt):
    a = ramp16()
    path = tmp_path / f"gray16.{fmt.lower()}"
    Image.fromarray(a).save(path, fmt)
    assert Image.open(path).mode == "I;16"
    ours = preprocess(path, PIXELS)[0]
    assert ours.shape == (3, 48, 64)
    for channel in ours:
        np.testing.assert_array_equal(channel, a >> 8)
    assert ours.min() == 0 and ours.max() == 255 and (ours < 255).mean() > 0.99  # not all white


def test_sixteen_bit_pgm_opens_as_mode_i_and_is_scaled(tmp_path):
    a = ramp16()
    path = tmp_path / "gray16.pgm"
    path.write_bytes(b"P5 64 48 65535\n" + a.astype(">u2").tobytes())
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(preprocess(path, PIXELS)[0, 1], a >> 8)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_pil_images_are_scaled(mode):
    a = ramp16()
    if mode == "I":
        wide = np.where(a > 60000, 70000, a.astype(np.int32))  # above 65535: clipped
        img, expect = Image.fromarray(wide), np.minimum(wide, 65535) >> 8
    else:
        img = Image.frombytes(mode, (64, 48), a.astype("<u2" if mode == "I;16" else ">u2").tobytes())
        expect = a >> 8
    assert img.mode == mode
    np.testing.assert_array_equal(preprocess(img, PIXELS)[0, 0], expect)


def test_sixteen_bit_gray_equals_pillows_own_sixteen_bit_rgb():
    """Pillow opens 16-bit RGB PNGs as 8-bit RGB by the high byte: gray files agree with it."""
    a = ramp16()
    rgb16 = np.repeat(a[..., None], 3, -1).astype(">u2")
    rows = b"".join(b"\x00" + row.tobytes() for row in rgb16)
    colour = Image.open(io.BytesIO(png_bytes(64, 48, 16, 2, rows)))
    assert colour.mode == "RGB"
    np.testing.assert_array_equal(preprocess(colour, PIXELS), preprocess(Image.fromarray(a), PIXELS))


def test_float_images_are_refused():
    img = Image.fromarray(np.full((8, 8), 0.5, np.float32))
    assert "32-bit float pixels (mode F)" in refused(img, "the given image")


# --- EXIF orientation ---------------------------------------------------------------------------

UPRIGHT = np.asarray(synthetic_image(60, 40, seed=4))
STORED = {  # orientation tag -> the pixels a camera stores for an UPRIGHT scene with that tag
    1: UPRIGHT, 2: UPRIGHT[:, ::-1], 3: UPRIGHT[::-1, ::-1], 4: UPRIGHT[::-1],
    5: UPRIGHT.transpose(1, 0, 2), 6: np.rot90(UPRIGHT, 1), 7: np.rot90(UPRIGHT, 1)[:, ::-1], 8: np.rot90(UPRIGHT, -1)}


def tagged(path: Path, orientation: int, fmt: str = "PNG") -> Path:
    img = Image.fromarray(np.ascontiguousarray(STORED[orientation]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_by_default(tmp_path, orientation):
    path = tagged(tmp_path / "photo.png", orientation)
    ours = preprocess(path, PIXELS)[0].transpose(1, 2, 0)
    np.testing.assert_array_equal(ours, UPRIGHT)
    stored = preprocess(path, PIXELS, exif_transpose=False)[0].transpose(1, 2, 0)
    np.testing.assert_array_equal(stored, STORED[orientation])


@pytest.mark.parametrize("steps", [MINIGPT4, LLAVA], ids=["minigpt4", "llava15"])
def test_no_exif_transpose_reproduces_the_original_loaders(tmp_path, steps):
    """MiniGPT-4 and LLaVA load with ``Image.open(path).convert('RGB')``, ignoring EXIF."""
    path = tagged(tmp_path / "phone.jpg", 6, "JPEG")
    original = preprocess(Image.open(path).convert("RGB"), steps, exif_transpose=False)  # what they compute
    np.testing.assert_array_equal(preprocess(path, steps, exif_transpose=False), original)
    assert not np.array_equal(preprocess(path, steps), original)


def test_a_pil_image_with_exif_is_turned_and_left_unchanged(tmp_path):
    img = Image.open(tagged(tmp_path / "photo.png", 8))
    np.testing.assert_array_equal(np.asarray(load_image(img).convert("RGB")), UPRIGHT)
    assert img.size == (40, 60) and img.getexif().get(0x0112) == 8
    assert load_image(img, exif_transpose=False) is img


@pytest.mark.parametrize("steps", [MINIGPT4, LLAVA], ids=["minigpt4", "llava15"])
def test_ordinary_files_give_the_pil_images_pixels_bit_for_bit(tmp_path, steps):
    for i, (w, h, mode) in enumerate([(173, 61, "RGB"), (97, 97, "L"), (80, 333, "RGBA"), (120, 90, "P")]):
        img = synthetic_image(w, h, seed=i, mode=mode)
        path = tmp_path / f"plain{i}.png"
        img.save(path)
        original = Image.open(path).convert("RGB")
        for exif in (True, False):
            np.testing.assert_array_equal(preprocess(path, steps, exif_transpose=exif), preprocess(original, steps))


def test_a_palette_with_transparency_reads_as_the_loaders_do_without_a_warning(tmp_path):
    path = tmp_path / "palette.png"  # a tRNS chunk of several entries: Pillow keeps it as bytes and warns
    synthetic_image(40, 30, seed=8).convert("P").save(path, transparency=bytes([0, 128] + [255] * 254))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = Image.open(path).convert("RGB")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(preprocess(path, PIXELS), preprocess(original, PIXELS))
    assert load_image(path).filename == str(path)  # a decoded file keeps its name for later messages


# --- URLs, paths and files that are no images ---------------------------------------------------

@pytest.mark.parametrize("url", ["http://example.com/cat.jpg", "https://example.com/a/cat.png?x=1",
                                 "HTTPS://EXAMPLE.COM/CAT.JPG", Path("https://example.com/cat.jpg")])
def test_urls_are_not_read(url):
    message = refused(url, "is a URL, and URLs are not read: download the file first")
    assert "does not exist" not in message and "example.com" in message.lower()


def test_a_file_url_points_at_the_path(tmp_path):
    message = refused(f"file://{tmp_path}/my%20cat.png", "is a URL, and URLs are not read")
    assert f"pass the file's path ('{tmp_path}/my cat.png') instead" in message


def test_bad_paths_and_files_name_the_file(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("these are not pixels\n")
    html = tmp_path / "cat.jpg"
    html.write_bytes(b"<!DOCTYPE html><html><body>Sign in to continue</body></html>")
    (tmp_path / "empty.png").write_bytes(b"")
    cases = {
        tmp_path / "missing.png": "does not exist",
        tmp_path / "missing" / "x.png": "does not exist",
        tmp_path: "cannot read image .*: it is a directory, not an image file",
        text: "cannot read image .*: not in an image format Pillow can read",
        html: "cannot read image .*: not in an image format Pillow can read",
        tmp_path / "empty.png": r"cannot read image .*: the file is empty \(0 bytes\)",
        text / "x.png": "does not exist",
    }
    for path, what in cases.items():
        assert f"'{path}'" in refused(path, what)
    refused(str(tmp_path / "a\0b.png"), "cannot read image .*embedded null")
    refused(12, "an image is a file path or a PIL image, not int")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this system")
def test_a_pipe_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)
    refused(fifo, "cannot read image .*: it is not a regular file")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_named(tmp_path, fmt):
    buf = io.BytesIO()
    synthetic_image(200, 150, seed=1).save(buf, fmt)
    data = buf.getvalue()
    for cut in (len(data) // 2, 60):
        path = tmp_path / f"cut{cut}.{fmt.lower()}"
        path.write_bytes(data[:cut])
        message = refused(path, f"cannot read image '{path}': (the file is damaged or truncated|not in an image format)")
        assert "Traceback" not in message


# --- bounded work -------------------------------------------------------------------------------

def test_a_decompression_bomb_is_refused_from_its_header(tmp_path, no_decode):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bytes(20000, 20000, 8, 2, None))  # 400 Mpixels: Pillow's own error
    assert refused(bomb, "decompression-bomb") == (f"image '{bomb}' has 400,000,000 pixels, above the limit of "
                                                   f"178,956,970 (Pillow's decompression-bomb limit): downscale it first")


def test_images_above_max_pixels_are_refused_before_decoding(tmp_path, monkeypatch, no_decode):
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(12000, 12000, 8, 2, None))  # Pillow warns (above half its limit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning must not escape: the refusal is ours
        monkeypatch.setattr(pre, "MAX_PIXELS", 100_000_000)
        message = refused(big, "above the limit of 100,000,000")
    assert message == (f"image '{big}' is 12000x12000 = 144,000,000 pixels, above the limit of 100,000,000 "
                       f"(MAX_PIXELS): downscale it first")
    monkeypatch.setattr(pre, "MAX_PIXELS", 150)
    refused(synthetic_image(20, 10, seed=0), r"^the given image is 20x10 = 200 pixels")


def test_check_image_reads_the_header_only(tmp_path, no_decode):
    """What a command runs before it opens a bundle: the same refusals, in milliseconds."""
    good = tmp_path / "wide.png"
    good.write_bytes(png_bytes(3000, 2000, 8, 2, None))  # no pixel data at all: never decoded
    assert check_image(good) == (3000, 2000)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bytes(20000, 20000, 8, 2, None))
    for bad, what in [(bomb, "above the limit of 178,956,970"), (tmp_path / "nope.png", "does not exist"),
                      ("https://example.com/x.png", "URLs are not read"), (tmp_path, "is a directory")]:
        with pytest.raises(InputError, match=what):
            check_image(bad)


def test_load_image_is_idempotent_and_names_the_file_of_a_pil_image(tmp_path, monkeypatch):
    path = tagged(tmp_path / "photo.png", 6)
    once = load_image(path)
    np.testing.assert_array_equal(np.asarray(load_image(once)), np.asarray(once))  # turned once only
    np.testing.assert_array_equal(np.asarray(once.convert("RGB")), UPRIGHT)
    monkeypatch.setattr(pre, "MAX_PIXELS", 100)
    refused(Image.open(path), f"image '{path}' is 40x60 = 2,400 pixels")


def test_max_pixels_is_pillows_own_error_limit():
    assert pre.MAX_PIXELS == 2 * Image.MAX_IMAGE_PIXELS == 178_956_970


def test_a_panorama_is_padded_on_a_bounded_canvas(monkeypatch):
    sizes = []
    new = Image.new
    pano = synthetic_image(20000, 100, seed=2)
    monkeypatch.setattr(Image, "new", lambda mode, size, *a, **k: sizes.append(size) or new(mode, size, *a, **k))
    out = preprocess(pano, LLAVA)
    assert out.shape == (1, 3, 336, 336) and out.dtype == np.float32
    assert sizes == [(pre.PAD_MAX_SIDE, pre.PAD_MAX_SIDE)]
    fill = (np.array([122, 116, 104]) / 255 - CLIP_MEAN) / CLIP_STD
    np.testing.assert_allclose(out[0, :, :160].mean((1, 2)), fill, atol=1e-5)  # padding above
    assert np.abs(out[0, :, 167:169] - fill[:, None, None]).mean() > 0.3  # the panorama's band


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory is read from /proc/self/status")
def test_a_panorama_costs_little_memory(tmp_path):
    """Peak resident memory (VmHWM, which unlike ru_maxrss a child does not inherit from the test
    process) of a fresh process; the unbounded canvas alone would be 1.6 GB."""
    script = f"""
import json, re, numpy as np
from PIL import Image
from vlm2om.runtime.preprocess import preprocess
peak = lambda: int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024
Image.fromarray(np.zeros((100, 20000, 3), np.uint8)).save({str(tmp_path / 'pano.png')!r})
before = peak()
out = preprocess({str(tmp_path / 'pano.png')!r}, {json.dumps(LLAVA)})
after = peak()
control = np.ones(400 * 2**20, np.uint8)  # proves the measure sees a 400 MB allocation
print(json.dumps([after - before, peak() - after, list(out.shape)]))
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    growth, control, shape = json.loads(run.stdout)
    assert shape == [1, 3, 336, 336]
    assert control > 300 * 2**20, control
    assert growth < 120 * 2**20, growth


def test_padding_up_to_the_bound_is_exact_and_beyond_it_close(monkeypatch):
    exact = synthetic_image(pre.PAD_MAX_SIDE, 900, seed=5)
    square = llava_expand2square(exact, (122, 116, 104))
    np.testing.assert_array_equal(preprocess(exact, LLAVA), preprocess(square, llava_steps(336, pad=False)))
    wide = synthetic_image(6000, 1000, seed=6).resize((300, 50)).resize((6000, 1000), Image.Resampling.BICUBIC)
    bounded = preprocess(wide, LLAVA)
    monkeypatch.setattr(pre, "PAD_MAX_SIDE", 10**6)
    unbounded = preprocess(wide, LLAVA)  # LLaVA's own 6000-square canvas
    levels = np.abs(bounded - unbounded) * np.asarray(CLIP_STD)[:, None, None] * 255
    assert levels.mean() < 0.5 and levels.max() < 12, (levels.mean(), levels.max())


def test_resize_shortest_refuses_an_extreme_aspect_without_padding():
    sliver = synthetic_image(20000, 10, seed=7)
    with pytest.raises(InputError, match=r"the given image \(20000x10\) is too elongated: .* 672000x336") as e:
        preprocess(sliver, llava_steps(336, pad=False))
    assert "\n" not in str(e.value)


def test_damaged_files_of_every_format_are_refused_or_read(tmp_path):
    """Seeded byte flips, cuts and insertions in small files of each format Pillow writes: only an
    ``InputError`` (one line, naming the file) or a well-formed tensor, never another exception."""
    rng = random.Random(13)
    seeds = {}
    for fmt in ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM"]:
        buf = io.BytesIO()
        synthetic_image(50, 40, seed=3).save(buf, fmt)
        seeds[fmt] = buf.getvalue()
    path = tmp_path / "damaged.img"
    for _ in range(240):
        data = bytearray(seeds[rng.choice(sorted(seeds))])
        for _ in range(rng.randint(1, 6)):
            k, at = rng.random(), rng.randrange(len(data))
            if k < 0.5:
                data[at] = rng.randrange(256)
            elif k < 0.8 and at > 0:
                del data[at:]
            else:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        path.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                assert preprocess(path, LLAVA).shape == (1, 3, 336, 336)
            except InputError as e:
                assert f"'{path}'" in str(e) and "\n" not in str(e)


def test_pipeline_turns_photos_upright_unless_told(tmp_path, tiny_bundle):
    """The chat pipeline applies EXIF orientation by default; ``exif_transpose=False`` (the CLI's
    --no-exif-transpose, and verify --reference) encodes the pixels as stored, as the originals do."""
    from vlm2om.runtime import Bundle
    from vlm2om.runtime.pipeline import VisionChatPipeline

    upright = synthetic_image(64, 48, seed=3)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera writes for orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "phone.jpg"
    stored.save(path, quality=100, exif=exif.tobytes())
    plain = tmp_path / "plain.png"
    Image.open(path).convert("RGB").save(plain)
    b = Bundle.open(tiny_bundle)
    turned, raw = VisionChatPipeline(b), VisionChatPipeline(b, exif_transpose=False)
    np.testing.assert_array_equal(raw.encode_image(path), raw.encode_image(plain))
    assert not np.allclose(turned.encode_image(path), raw.encode_image(path))
    np.testing.assert_array_equal(turned.encode_image(path),
                                  raw.encode_image(ImageOps.exif_transpose(Image.open(path)).convert("RGB")))
