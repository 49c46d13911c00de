"""Images a user gives `vlm2om run` and `vlm2om chat`, end to end through the commands: each is
refused in one line naming the file before the bundle is even opened, or reaches the model as a
person sees it. The session bundles are byte-identical after every case."""
from __future__ import annotations

import io
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.helpers.bundles import copy_bundle
from tests.helpers.faults import expect_error, invoke, invoke_fresh, leftovers, snapshot
from tests.helpers.images import synthetic_image

ASK = ("--prompt", "What is it?", "--greedy", "--max-new-tokens", "3")


@pytest.fixture(params=["tiny_bundle", "llava_bundle"], ids=["minigpt4", "llava15"])
def bundle(request):
    """A session bundle, checked unchanged (and nothing hidden left beside it) after the case."""
    path = request.getfixturevalue(request.param)
    before = snapshot(path)
    yield path
    assert snapshot(path) == before
    assert leftovers(path.parent) == []


@pytest.fixture
def never_opened(monkeypatch):
    """Fails a case that opens the bundle: input errors must come first."""
    def refuse(*args, **kw):
        raise AssertionError("the bundle was opened before the input was checked")
    monkeypatch.setattr("vlm2om.runtime.bundle.Bundle.open", refuse)


@pytest.fixture
def encoded(monkeypatch):
    """The pixel tensors the pipeline encodes, as the command runs: what reaches the model."""
    from vlm2om.runtime import pipeline

    seen, real = [], pipeline.preprocess
    monkeypatch.setattr(pipeline, "preprocess", lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
    return seen


def png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h RGB pixels and holds none (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def cut(tmp_path, fmt: str):
    buf = io.BytesIO()
    synthetic_image(200, 150, seed=1).save(buf, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    return path


def bad_images(tmp_path):
    """name -> (image argument, exact message a user sees)."""
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("these are not pixels\n")
    (tmp_path / "bomb.png").write_bytes(png_header(20000, 20000))
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "float.tiff")
    png, jpg = cut(tmp_path, "PNG"), cut(tmp_path, "JPEG")
    t = tmp_path
    return {
        "missing": (t / "nope.png", f"image '{t}/nope.png' does not exist"),
        "directory": (t, f"cannot read image '{t}': it is a directory, not an image file"),
        "empty": (t / "empty.png", f"cannot read image '{t}/empty.png': the file is empty (0 bytes)"),
        "not an image": (t / "notes.png", f"cannot read image '{t}/notes.png': not in an image format Pillow "
                                          "can read (PNG, JPEG, WebP, GIF, BMP, TIFF, ...)"),
        "truncated png": (png, f"cannot read image '{png}': the file is damaged or truncated (PNG: image file "
                               "is truncated"),
        "truncated jpeg": (jpg, f"cannot read image '{jpg}': the file is damaged or truncated (JPEG: image file "
                                "is truncated"),
        "bomb": (t / "bomb.png", f"image '{t}/bomb.png' has 400,000,000 pixels, above the limit of 178,956,970 "
                                 "(Pillow's decompression-bomb limit): downscale it first"),
        "url": ("https://example.com/cat.jpg", "image 'https://example.com/cat.jpg' is a URL, and URLs are not "
                                               "read: download the file first and pass its path"),
        "file url": (f"file://{t}/my%20cat.png", f"image 'file://{t}/my%20cat.png' is a URL, and URLs are not "
                                                 f"read: pass the file's path ('{t}/my cat.png') instead"),
        "float pixels": (t / "float.tiff", f"image '{t}/float.tiff' has 32-bit float pixels (mode F), whose range "
                                           "is not known: save it as an 8- or 16-bit PNG first"),
    }


CASES = ["missing", "directory", "empty", "not an image", "truncated png", "truncated jpeg", "bomb", "url",
         "file url", "float pixels"]


@pytest.mark.parametrize("case", CASES)
def test_a_bad_image_is_named_before_the_bundle_opens(tmp_path, bundle, never_opened, case):
    image, message = bad_images(tmp_path)[case]
    out = expect_error(invoke("run", bundle, "--image", image, *ASK), message, code=1)
    assert out.count("Error") == 1 and len(out.strip().splitlines()) == 1, out


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this system")
def test_a_pipe_as_image_does_not_block_chat(tmp_path, bundle, never_opened):
    os.mkfifo(tmp_path / "cam.png")
    expect_error(invoke("chat", bundle, "--image", tmp_path / "cam.png", input="hi\n"),
                 f"cannot read image '{tmp_path}/cam.png': it is not a regular file", code=1)


@pytest.mark.parametrize("case", ["missing", "truncated jpeg"])
def test_the_image_error_comes_before_a_damaged_bundle_is_noticed(tmp_path, tiny_bundle, case):
    """A fresh process on a bundle whose decoder file is gone still names the image first."""
    broken = copy_bundle(tiny_bundle, tmp_path, "broken")
    (broken / "decoder_1.onnx").unlink()
    image, message = bad_images(tmp_path)[case]
    for command in (["run", broken, "--image", image, *ASK], ["chat", broken, "--image", image]):
        out = expect_error(invoke_fresh(*command, input="hi\n"), message, code=1)
        assert "decoder_1.onnx" not in out
    # With a good image the bundle's own fault is reported, as before.
    expect_error(invoke("run", broken, "--image", synthetic_png(tmp_path), *ASK), "missing: decoder_1.onnx", code=1)


def synthetic_png(tmp_path, seed: int = 0):
    path = tmp_path / f"ok{seed}.png"
    synthetic_image(64, 48, seed=seed).save(path)
    return path


def test_sixteen_bit_png_is_scaled_not_white(tmp_path, bundle, encoded):
    a = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 65535 // (64 * 48 - 1)).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "gray16.png")
    Image.fromarray((a >> 8).astype(np.uint8)).save(tmp_path / "gray8.png")
    Image.new("L", (64, 48), 255).save(tmp_path / "white.png")
    for name in ("gray16.png", "gray8.png", "white.png"):
        r = invoke("run", bundle, "--image", tmp_path / name, *ASK)
        assert r.code == 0 and r.exception is None, r.output
    sixteen, eight, white = encoded
    np.testing.assert_array_equal(sixteen, eight)  # the high byte of every value
    assert not np.allclose(sixteen, white)


def test_an_exif_rotated_photo_is_turned_upright_unless_told(tmp_path, bundle, encoded):
    upright = synthetic_image(64, 48, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned; "rotate 90 clockwise to display"
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.jpg", quality=95, exif=exif.tobytes())
    shown = ImageOps.exif_transpose(Image.open(tmp_path / "phone.jpg")).convert("RGB")
    shown.save(tmp_path / "shown.png")  # the same pixels, upright, without EXIF
    Image.open(tmp_path / "phone.jpg").convert("RGB").save(tmp_path / "stored.png")  # what the originals read
    for args in (["phone.jpg"], ["shown.png"], ["phone.jpg", "--no-exif-transpose"], ["stored.png"]):
        r = invoke("run", bundle, "--image", tmp_path / args[0], *args[1:], *ASK)
        assert r.code == 0 and r.exception is None, r.output
    turned, shown_t, raw, stored_t = encoded
    np.testing.assert_array_equal(turned, shown_t)
    np.testing.assert_array_equal(raw, stored_t)
    assert not np.allclose(turned, raw)


@pytest.mark.parametrize("mode", ["CMYK", "P+transparency", "1", "LA"])
def test_unusual_modes_are_read_as_the_original_loaders_read_them(tmp_path, bundle, encoded, mode):
    """Each is ``Image.open(path).convert('RGB')``, as MiniGPT-4 and LLaVA load, without a warning."""
    img = synthetic_image(64, 48, seed=4)
    path = tmp_path / ("photo.jpg" if mode == "CMYK" else "photo.png")
    if mode == "P+transparency":  # a tRNS chunk of several entries: Pillow keeps it as bytes and warns
        img.convert("P").save(path, transparency=bytes([0, 128] + [255] * 254))
    else:
        img.convert(mode).save(path)
    plain = tmp_path / "plain.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's own, on the palette with transparency
        Image.open(path).convert("RGB").save(plain)
    for image in (path, plain):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # a warning would end the command
            r = invoke("run", bundle, "--image", image, *ASK)
        assert r.code == 0 and r.exception is None and "arning" not in r.output, r.output
    np.testing.assert_array_equal(*encoded)


def test_a_second_image_in_chat_is_answered_with_the_reason(tmp_path, bundle):
    r = invoke("chat", bundle, "--image", synthetic_png(tmp_path), "--greedy", "--max-new-tokens", "2",
               input=f"/image {synthetic_png(tmp_path, 1)}\nWhat is it?\n")
    out = expect_error(r, "Error: /image: a chat is about the one image given with --image; start a new chat to "
                          "ask about another image", code=0)
    assert out.count("assistant> ") == 1  # the chat went on


@pytest.mark.parametrize("exif", [[], ["--no-exif-transpose"]], ids=["upright", "as-stored"])
def test_a_damaged_exif_block_is_one_warning_naming_the_file(tmp_path, bundle, exif):
    path = tmp_path / "odd.jpg"
    synthetic_image(64, 48, seed=1).save(path, exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x05\x00" + b"junk" * 4)
    out = expect_error(invoke("run", bundle, "--image", path, *exif, *ASK), code=0)
    warned = [line for line in out.splitlines() if "arning" in line]
    assert len(warned) == 1 and warned[0].startswith(f"warning: image '{path}': Corrupt EXIF data."), out


@pytest.mark.parametrize("command", ["verify", "bench"])
@pytest.mark.parametrize("image", ["https://example.com/cat.jpg", "missing.png"], ids=["url", "missing"])
def test_verify_and_bench_name_a_bad_image_before_the_bundle_opens(tmp_path, tiny_bundle, never_opened,
                                                                    command, image):
    if image == "missing.png":
        image = str(tmp_path / image)
    args = ("verify", tiny_bundle, "--reference", "--image", image) if command == "verify" else \
        ("bench", tiny_bundle, "--image", image, "--batch", "1")
    needle = "is a URL, and URLs are not read" if image.startswith("https") else "does not exist"
    expect_error(invoke(*args), f"image '{image}'", needle, code=1)
