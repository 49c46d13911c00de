"""Fault corpus: the Ascend side (`lint`, `compile`) on damaged bundles. A damaged or hand-edited
manifest is named by key before any graph is linted, a graph altered in place is reported by its
hash, and nothing is written into the bundle."""
from __future__ import annotations

import json

import pytest

from tests.helpers.bundles import copy_bundle
from tests.helpers.faults import expect_error, invoke, leftovers, snapshot

# (edit of the manifest, what the message names)
DAMAGE = {
    "graphs-not-an-object": (lambda m: m.update(graphs="abc"), "graphs must be an object"),
    "graph-without-file": (lambda m: m["graphs"]["decoder_1"].pop("file"), "graphs.decoder_1.file is missing"),
    "gears-of-strings": (lambda m: m["graphs"]["decoder_0"].update(gears=["1,128"]), "graphs.decoder_0.gears[0]"),
    "no-schema-version": (lambda m: m.pop("schema_version"), "schema_version is missing"),
}


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle, tmp_path)
    yield b
    assert leftovers(tmp_path) == []


def _damage(bundle, edit) -> dict:
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m, indent=1))
    return snapshot(bundle)


@pytest.mark.parametrize("case", list(DAMAGE))
@pytest.mark.parametrize("command", ["lint", "compile"])
def test_a_damaged_manifest_is_named_before_linting(bundle, case, command):
    edit, needle = DAMAGE[case]
    before = _damage(bundle, edit)
    args = ("compile", bundle, "--script-only") if command == "compile" else ("lint", bundle)
    expect_error(invoke(*args), "manifest.json", needle, code=1)
    assert snapshot(bundle) == before


def test_lint_reports_a_graph_altered_in_place(bundle):
    graph = bundle / "decoder_1.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 0x01  # the last byte of a weight: still a valid ONNX file, no longer the verified one
    graph.write_bytes(bytes(data))
    before = snapshot(bundle)
    out = expect_error(invoke("lint", bundle), "decoder_1.onnx", "sha256 differs", code=1)
    assert "re-export the bundle" in out
    assert snapshot(bundle) == before
