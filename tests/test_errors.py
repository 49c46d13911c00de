"""Bad input gets a clear error naming what is at fault, and leaves nothing behind."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlm2om.runtime import BundleError, GenerationConfig, InputError, open_bundle

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "vlm2om", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_bundle, dst)
    return dst


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


def test_unknown_model_name(tmp_path):
    r = cli("export", "gpt5", "--out", tmp_path / "x")
    assert r.returncode == 1 and "unknown model 'gpt5'" in r.stderr and "minigpt4" in r.stderr
    assert not (tmp_path / "x").exists()


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = cli("export", "minigpt4", "--out", blocker / "bundle")
    assert r.returncode == 1 and "cannot write the bundle" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_refuses_to_replace_a_non_bundle_folder(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    r = cli("export", "minigpt4", "--out", target)
    assert r.returncode == 1 and "not a bundle" in r.stderr
    assert (target / "notes.txt").read_text() == "keep me"


def test_failed_export_keeps_previous_bundle(bundle_copy, tiny_opts, monkeypatch):
    from vlm2om.exporters.families.minigpt4 import recipe as minigpt4
    from vlm2om.exporters.verify import metrics as verify
    from vlm2om.exporters.core.driver import write_bundle

    before = (bundle_copy / "manifest.json").read_bytes()
    monkeypatch.setitem(verify.THRESHOLDS, "float32", {"cosine": 1.1, "rel_euclid": -1.0})
    with pytest.raises(verify.VerificationError, match="vision"):
        write_bundle(minigpt4.plan(tiny_opts), bundle_copy, echo=lambda s: None)
    assert (bundle_copy / "manifest.json").read_bytes() == before
    assert [p.name for p in bundle_copy.parent.iterdir() if p.name.startswith(".")] == []
    open_bundle(bundle_copy)  # still intact


def test_bad_generation_options():
    with pytest.raises(InputError, match="top_p"):
        GenerationConfig(top_p=0)
    with pytest.raises(InputError, match="temperature"):
        GenerationConfig(temperature=0)
