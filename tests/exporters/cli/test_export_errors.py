"""`vlm2om export` on bad input: a clear error naming what is at fault, and nothing left behind
(no half-written bundle, a previous bundle kept)."""
from __future__ import annotations

import pytest

from tests.helpers import run_cli as cli
from tests.helpers.bundles import copy_bundle
from vlm2om.runtime import open_bundle


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    return copy_bundle(tiny_bundle, tmp_path, "copy")


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
