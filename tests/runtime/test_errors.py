"""A bad bundle, image, prompt or option gets a clear error naming what is at fault."""
from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli as cli
from tests.helpers.bundles import copy_bundle
from vlm2om.runtime import BundleError, GenerationConfig, InputError, open_bundle


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    return copy_bundle(tiny_bundle, tmp_path, "copy")


def test_missing_file_is_named(bundle_copy):
    (bundle_copy / "decoder_1.onnx").unlink()
    with pytest.raises(BundleError, match="missing: decoder_1.onnx"):
        open_bundle(bundle_copy)


def test_altered_file_is_named(bundle_copy):
    p = bundle_copy / "tokenizer.model"
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="altered: tokenizer.model"):
        open_bundle(bundle_copy)


def test_unknown_schema_version(bundle_copy):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["schema_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="schema_version 99"):
        open_bundle(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="manifest.json is missing"):
        open_bundle(tmp_path)


def test_unreadable_image(tiny_bundle, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    pipe = open_bundle(tiny_bundle)
    with pytest.raises(InputError, match="cannot read image .*broken.png"):
        pipe.chat(bad)
    with pytest.raises(InputError, match="does not exist"):
        pipe.chat(tmp_path / "nope.jpg")
    r = cli("run", tiny_bundle, "--image", bad, "--prompt", "hi")
    assert r.returncode == 1 and "cannot read image" in r.stderr and "Traceback" not in r.stderr


def test_prompt_longer_than_largest_gear(tiny_bundle, sample_image):
    chat = open_bundle(tiny_bundle).chat(sample_image)
    with pytest.raises(InputError, match="largest cache gear holds 256"):
        list(chat.ask("tell me more " * 200, GenerationConfig(max_new_tokens=2)))
    # The conversation is still usable afterwards.
    list(chat.ask("What is it?", GenerationConfig(max_new_tokens=2)))
    assert len(chat.last.tokens) >= 1


def test_bad_generation_options():
    with pytest.raises(InputError, match="top_p"):
        GenerationConfig(top_p=0)
    with pytest.raises(InputError, match="temperature"):
        GenerationConfig(temperature=0)
