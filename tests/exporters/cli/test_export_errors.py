"""`vlm2om export` whose graphs fail verification: the error names the graph, and the previous
bundle is kept. Bad options, paths, checkpoints, disks and signals: the fault corpus (tests/faults/)."""
from __future__ import annotations

import pytest

from tests.helpers.bundles import copy_bundle
from vlm2om.runtime import open_bundle


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    return copy_bundle(tiny_bundle, tmp_path, "copy")


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
