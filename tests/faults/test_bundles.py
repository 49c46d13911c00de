"""Fault corpus: bundle folders and graph files. A missing, truncated or foreign graph file is named
(a foreign ONNX of the wrong shape, its hash re-signed, when its session opens, never inside
onnxruntime's first run); a bad bundle path says what it is; `verify` reports files the manifest
does not list; a bundle on a read-only mount runs. Nothing here writes into the bundle."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import SAMPLE_IMAGE
from tests.helpers.bundles import copy_bundle
from tests.helpers.faults import expect_error, invoke, leftovers, snapshot
from tests.helpers.mounts import read_only
from vlm2om.runtime.bundle import sha256_file

RUN = ("--image", SAMPLE_IMAGE, "--prompt", "What is in the picture?", "--greedy", "--max-new-tokens", "2")


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    return copy_bundle(tiny_bundle, tmp_path)


def _resign(bundle, *names) -> None:
    """Record the files' current sha256 and size, as a bundle rebuilt wrongly would."""
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    for name in names:
        m["files"][name] = {"sha256": sha256_file(bundle / name), "bytes": (bundle / name).stat().st_size}
    path.write_text(json.dumps(m, indent=1))


def _entry(bundle, graph: str) -> dict:
    return json.loads((bundle / "manifest.json").read_text())["graphs"][graph]


def _stub_graph(entry: dict, change=lambda kind, i, shape: shape):
    """A valid ONNX model with the entry's inputs and outputs (shapes edited by ``change``) that
    returns zeros; an output's gear dim takes its size from an input that has it."""
    from onnx import helper, numpy_helper

    def info(spec, shape):
        return helper.make_tensor_value_info(spec["name"], helper.np_dtype_to_tensor_dtype(np.dtype(spec["dtype"])),
                                             shape)

    def const(name, value):
        nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value)))
        return name

    ins = [change("input", i, list(s["shape"])) for i, s in enumerate(entry["inputs"])]
    where = {d: (entry["inputs"][i]["name"], axis) for i, shape in enumerate(ins)
             for axis, d in enumerate(shape) if isinstance(d, str)}
    nodes, outs = [], []
    for i, spec in enumerate(entry["outputs"]):
        shape, name, dims = change("output", i, list(spec["shape"])), spec["name"], []
        for axis, d in enumerate(shape):
            if isinstance(d, int):
                dims.append(const(f"{name}_d{axis}", np.array([d], np.int64)))
                continue
            src, at = where[d]
            nodes.append(helper.make_node("Shape", [src], [f"{name}_s{axis}"]))
            nodes.append(helper.make_node("Gather", [f"{name}_s{axis}", const(f"{name}_i{axis}", np.array([at]))],
                                          [f"{name}_d{axis}"]))
            dims.append(f"{name}_d{axis}")
        nodes.append(helper.make_node("Concat", dims, [f"{name}_shape"], axis=0))
        nodes.append(helper.make_node("Expand", [const(f"{name}_zero", np.zeros((), spec["dtype"])), f"{name}_shape"],
                                      [name]))
        outs.append(info(spec, shape))
    graph = helper.make_graph(nodes, "stub", [info(s, shape) for s, shape in zip(entry["inputs"], ins)], outs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _refused(bundle, *needles, command="run", args=RUN) -> str:
    before = snapshot(bundle)
    out = expect_error(invoke(command, bundle, *args), *needles, code=1)
    assert snapshot(bundle) == before
    assert leftovers(bundle.parent) == []
    return out


def test_a_missing_graph_file_is_named(bundle):
    (bundle / "decoder_1.onnx").unlink()
    _refused(bundle, f"bundle '{bundle}' is damaged", "missing: decoder_1.onnx")


def test_a_truncated_graph_file_is_named_even_without_the_hash_check(bundle):
    path = bundle / "decoder_1.onnx"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:1000])
    _refused(bundle, f"altered: decoder_1.onnx (1000 bytes, manifest says {size})", args=(*RUN, "--no-hash-check"))


def test_a_graph_file_altered_in_place_is_named(bundle):
    path = bundle / "embed.onnx"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    _refused(bundle, "altered: embed.onnx (sha256 differs from the manifest)")


def test_a_truncated_graph_file_with_its_hash_resigned_is_named(bundle):
    path = bundle / "decoder_1.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    _resign(bundle, "decoder_1.onnx")
    _refused(bundle, f"graph 'decoder_1': onnxruntime cannot load '{path}'")


def test_a_wrong_shape_onnx_with_its_hash_resigned_is_named_at_open(bundle):
    """Another valid ONNX whose cache has 8 heads where the manifest (and the rest of the bundle) has 4."""
    import onnx

    entry = _entry(bundle, "decoder_0")
    stub = _stub_graph(entry, lambda kind, i, shape: [*shape[:3], 8, *shape[4:]]
                       if kind == "input" and entry["inputs"][i]["name"] == "past_kv" else shape)
    onnx.save(stub, str(bundle / "decoder_0.onnx"))
    _resign(bundle, "decoder_0.onnx")
    out = _refused(bundle, "graph 'decoder_0' (decoder_0.onnx): input 'past_kv' is float32[1,2,1,8,cache,16] in the "
                           "file, the manifest declares float32[1,2,1,4,cache,16]; the file does not belong to this "
                           "bundle (re-export it)")
    assert "onnxruntime" not in out


def test_a_stub_of_the_right_shape_opens(bundle):
    """The stub itself is a sound graph: with the declared shapes, the run goes through (zeros in, an
    answer of the first token out), so the failure above is the shape's alone."""
    import onnx

    onnx.save(_stub_graph(_entry(bundle, "decoder_0")), str(bundle / "decoder_0.onnx"))
    _resign(bundle, "decoder_0.onnx")
    r = invoke("run", bundle, *RUN)
    assert r.code == 0 and r.exception is None, r.output


def test_another_graph_of_the_bundle_in_a_graph_s_place_is_named(bundle):
    (bundle / "decoder_1.onnx").write_bytes((bundle / "embed.onnx").read_bytes())
    _resign(bundle, "decoder_1.onnx")
    _refused(bundle, "graph 'decoder_1' (decoder_1.onnx) does not match the manifest, so the file does not belong to "
                     "this bundle (re-export it):", "the file has inputs ['input_ids'], the manifest declares "
                     "['hidden_states', 'position_ids', 'attention_mask', 'past_kv', 'logits_index']")


def test_verify_names_a_wrong_shape_graph_too(tiny_batch_bundle, tmp_path):
    import onnx

    bundle = copy_bundle(tiny_batch_bundle, tmp_path)
    entry = _entry(bundle, "embed")
    onnx.save(_stub_graph(entry, lambda kind, i, shape: [*shape[:2], 32] if kind == "output" else shape),
              str(bundle / "embed.onnx"))
    _resign(bundle, "embed.onnx")
    _refused(bundle, "graph 'embed' (embed.onnx): output 'inputs_embeds' is float32[batch,seq,32] in the file, the "
                     "manifest declares float32[batch,seq,64]", command="verify",
             args=("--golden", "--graph", "embed", "--out", tmp_path / "reports"))


def test_a_tokenizer_replaced_by_garbage_is_named(bundle):
    (bundle / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    _resign(bundle, "tokenizer.model")
    _refused(bundle, f"cannot load tokenizer '{bundle / 'tokenizer.model'}'")


def test_verify_reports_files_the_manifest_does_not_list(tiny_batch_bundle, tmp_path):
    bundle = copy_bundle(tiny_batch_bundle, tmp_path)
    (bundle / "notes.txt").write_text("my notes")
    (bundle / "om").mkdir()
    (bundle / "om" / "decoder_0_old.om").write_bytes(b"stale")
    before = snapshot(bundle)
    r = invoke("verify", bundle, "--golden", "--graph", "embed", "--out", tmp_path / "reports")
    assert r.code == 0 and r.exception is None and "Traceback" not in r.output, r.output
    assert (f"warning: {bundle} holds 2 files that its manifest does not list, so nothing checks or uses them: "
            "notes.txt, om/decoder_0_old.om") in r.output
    report = json.loads((tmp_path / "reports" / "verify_minigpt4.json").read_text())
    assert report["unlisted_files"] == ["notes.txt", "om/decoder_0_old.om"] and report["passed"]
    assert snapshot(bundle) == before
    r = invoke("verify", copy_bundle(tiny_batch_bundle, tmp_path, "clean"), "--golden", "--graph", "embed",
               "--out", tmp_path / "reports")
    assert r.code == 0 and "does not list" not in r.output


def test_verify_exif_transpose_is_for_image_files(tiny_batch_bundle, tmp_path):
    r = invoke("verify", tiny_batch_bundle, "--golden", "--exif-transpose")
    expect_error(r, "--image, --exif-transpose, --prompt and --follow-up make --reference cases", code=2)
    r = invoke("verify", tiny_batch_bundle, "--reference", "--exif-transpose")
    expect_error(r, "--exif-transpose applies to --image files", code=2)
    assert "--no-exif-transpose" in invoke("verify", "--help").output


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("hello"), "is a file, not a bundle folder (give the folder that holds manifest.json)"),
    (lambda p: p.mkdir(), "is not a bundle: manifest.json is missing"),
    (lambda p: None, "does not exist"),
], ids=["a-file", "an-empty-folder", "nothing"])
@pytest.mark.parametrize("command", ["run", "verify"])
def test_a_bundle_path_that_is_no_bundle(tmp_path, make, message, command):
    path = tmp_path / "bundle"
    make(path)
    args = RUN if command == "run" else ("--golden", "--out", tmp_path / "reports")
    expect_error(invoke(command, path, *args), f"'{path}'", message, code=1)
    assert leftovers(tmp_path) == [] and not (tmp_path / "reports").exists()


@pytest.fixture
def read_only_bundle(tiny_bundle, tmp_path):
    """A copy of the tiny bundle seen through a read-only bind mount (root ignores mode bits)."""
    with read_only(copy_bundle(tiny_bundle, tmp_path, "src"), tmp_path / "ro") as view:
        yield view


def test_a_bundle_on_a_read_only_mount_runs(read_only_bundle):
    before = snapshot(read_only_bundle)
    r = invoke("run", read_only_bundle, *RUN)
    assert r.code == 0 and r.exception is None and "Traceback" not in r.output, r.output
    assert snapshot(read_only_bundle) == before
