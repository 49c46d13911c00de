"""`vlm2om bench --image`: the image is read as `run` reads it, EXIF orientation applied unless
--no-exif-transpose (the original loaders' reading), and a bad image is named before the bundle opens."""
from __future__ import annotations

import pytest

from tests.helpers.faults import expect_error, invoke

GRID = ("--batch", "1", "--input-lengths", "125", "--output-lengths", "2")


@pytest.mark.parametrize("flag,applied", [(None, True), ("--exif-transpose", True), ("--no-exif-transpose", False)])
def test_exif_flag_reaches_the_image_reader(tiny_bundle, sample_image, tmp_path, monkeypatch, flag, applied):
    from vlm2om.runtime import pipeline

    seen, real = [], pipeline.preprocess

    def spy(image, steps, **kw):
        seen.append(kw.get("exif_transpose"))
        return real(image, steps, **kw)

    monkeypatch.setattr(pipeline, "preprocess", spy)
    r = invoke("bench", tiny_bundle, *GRID, "--image", sample_image, *([flag] if flag else []), "--out", tmp_path)
    assert r.code == 0, r.output
    assert seen and set(seen) == {applied}


def test_bad_image_is_named_before_the_bundle_opens(tiny_bundle, tmp_path, monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("the bundle was opened before the image was checked")

    monkeypatch.setattr("vlm2om.runtime.bundle.Bundle.open", refuse)
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"not a jpeg")
    expect_error(invoke("bench", tiny_bundle, *GRID, "--image", bad, "--out", tmp_path), str(bad), code=1)
