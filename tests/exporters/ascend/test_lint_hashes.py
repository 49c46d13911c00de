"""`vlm2om lint` on a bundle checks that its graph files are the ones the export verified."""
from __future__ import annotations

import onnx

from tests.helpers import run_cli
from tests.helpers.bundles import copy_bundle
from vlm2om.exporters.ascend.lint import errors, lint_path


def test_lint_names_a_graph_file_whose_hash_does_not_hold(tmp_path, tiny_bundle):
    assert not errors(lint_path(tiny_bundle))
    b = copy_bundle(tiny_bundle, tmp_path)
    model = onnx.load(str(b / "embed.onnx"))
    model.doc_string = "rewritten after the export"  # still a valid graph of the declared shapes
    onnx.save(model, str(b / "embed.onnx"))
    bad = errors(lint_path(b))
    assert [(f.graph, f.check, f.where) for f in bad] == [("embed", "hash", "embed.onnx")]
    r = run_cli("lint", b, "--no-info")
    assert r.returncode == 1 and "sha256 differs" in r.stdout


def test_run_checks_the_image_before_it_opens_the_bundle(tmp_path, tiny_bundle):
    """A missing image is named at once, even when the bundle itself is damaged (so it was not read)."""
    b = copy_bundle(tiny_bundle, tmp_path)
    (b / "decoder_1.onnx").write_bytes(b"damaged")
    r = run_cli("run", b, "--image", tmp_path / "missing.png", "--prompt", "Hi")
    assert r.returncode == 1 and "missing.png' does not exist" in r.stderr and "damaged" not in r.stderr
