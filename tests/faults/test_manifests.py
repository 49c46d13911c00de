"""Fault corpus: damaged and hand-edited manifests. Each is refused when the bundle opens, before any
graph loads, in one line (or a short list) naming the manifest file and the key path, with exit
status 1, no traceback, and the bundle left byte-identical (opening a bundle writes nothing)."""
from __future__ import annotations

import json

import pytest

from tests.helpers import SAMPLE_IMAGE
from tests.helpers.bundles import copy_bundle
from tests.helpers.faults import expect_error, invoke, leftovers, snapshot

RUN = ("--image", SAMPLE_IMAGE, "--prompt", "What is in the picture?", "--greedy", "--max-new-tokens", "2")


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    return copy_bundle(tiny_bundle, tmp_path)


def _edit(bundle, change) -> None:
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m, indent=1))


def _refused(bundle, *needles, command=("run",), args=RUN) -> str:
    """The command fails cleanly, naming the needles, and leaves the bundle as it was."""
    before = snapshot(bundle)
    out = expect_error(invoke(*command, bundle, *args), *needles, code=1)
    assert snapshot(bundle) == before
    assert leftovers(bundle.parent) == []
    return out


@pytest.mark.parametrize("key", ["schema_version", "family", "task", "files", "graphs", "pipeline", "kv_cache",
                                 "tokenizer", "prompt", "generation", "preprocess"])
def test_a_missing_top_level_key_is_named(bundle, key):
    _edit(bundle, lambda m: m.pop(key))
    _refused(bundle, f"{bundle / 'manifest.json'}: {key} is missing")


@pytest.mark.parametrize("change, message", [
    (lambda m: m["graphs"]["decoder_0"]["inputs"][2].update(shape="abc"),
     "graphs.decoder_0.inputs[2].shape must be a list, got 'abc'"),
    (lambda m: m.update(pipeline=["vision", "embed"]), "pipeline must be an object, got [\"vision\", \"embed\"]"),
    (lambda m: m["kv_cache"].update(capacity_gears="128,256"),
     "kv_cache.capacity_gears must be a list, got '128,256'"),
    (lambda m: m["files"]["embed.onnx"].update(bytes="131960"),
     "files['embed.onnx'].bytes must be an integer >= 0, got '131960'"),
    (lambda m: m["generation"].update(temperature="hot"), "generation.temperature must be a finite number, got 'hot'"),
    (lambda m: m["tokenizer"].update(eos_ids=2), "tokenizer.eos_ids must be a list, got 2"),
], ids=["shape-not-a-list", "pipeline-a-list", "capacity-gears-a-string", "bytes-a-string", "temperature-a-word",
        "eos-ids-an-int"])
def test_a_value_of_the_wrong_type_is_named(bundle, change, message):
    _edit(bundle, change)
    _refused(bundle, f"{bundle / 'manifest.json'}: {message}")


def test_an_empty_gear_list_is_named(bundle):
    _edit(bundle, lambda m: m["graphs"]["embed"].update(gears=[]))
    _refused(bundle, "graphs.embed.gears must be a non-empty list of gears ({dim: value}) or null, got []")


def test_a_gear_list_of_strings_is_named(bundle):
    _edit(bundle, lambda m: m["graphs"]["decoder_1"].update(gears=["1,128", "16,128"]))
    out = _refused(bundle, "has 2 problems", "graphs.decoder_1.gears[0] must be an object mapping each gear dim to "
                                             "a positive integer, got '1,128'", "graphs.decoder_1.gears[1]")
    assert "Error:" in out.splitlines()[0]


def test_an_unknown_dtype_is_named(bundle):
    _edit(bundle, lambda m: m["graphs"]["vision"]["inputs"][0].update(dtype="bfloat8"))
    _refused(bundle, "graphs.vision.inputs[0].dtype must be one of float32, float16", "got 'bfloat8'")


def test_a_graph_whose_file_is_not_listed_is_named(bundle):
    (bundle / "decoder_0.onnx").rename(bundle / "decoder_0_v2.onnx")
    _edit(bundle, lambda m: m["graphs"]["decoder_0"].update(file="decoder_0_v2.onnx"))
    _refused(bundle, "graphs.decoder_0.file names 'decoder_0_v2.onnx', which files does not list")


def test_a_graph_file_outside_the_bundle_is_refused(bundle):
    _edit(bundle, lambda m: m["graphs"]["vision"].update(file="/etc/passwd"))
    _refused(bundle, "graphs.vision.file must be a relative path inside the bundle folder, got '/etc/passwd'")


@pytest.mark.parametrize("change, message", [
    (lambda m: m["pipeline"]["decoder_graphs"].append("decoder_2"),
     "pipeline.decoder_graphs[2] names graph 'decoder_2', which graphs does not declare"),
    (lambda m: m["pipeline"].update(embed_graph="embeddings"), "pipeline.embed_graph names graph 'embeddings'"),
    (lambda m: m["pipeline"].update(image_output="image_feats"),
     "pipeline.image_output is 'image_feats', which no image graph outputs"),
], ids=["decoder", "embed", "image-output"])
def test_a_pipeline_pointing_at_a_missing_graph_or_tensor_is_named(bundle, change, message):
    _edit(bundle, change)
    _refused(bundle, message)


def test_a_tensor_without_its_role_is_named(bundle):
    _edit(bundle, lambda m: m["graphs"]["decoder_1"]["inputs"][4].pop("role"))
    _refused(bundle, "graphs.decoder_1.inputs[4] ('logits_index') has no role")


def test_a_kv_cache_that_does_not_fit_the_graphs_is_named(bundle):
    _edit(bundle, lambda m: m["kv_cache"].update(capacity_gears=[128, 512]))
    _refused(bundle, "kv_cache.capacity_gears [128, 512] are not the cache sizes graph 'decoder_0' runs at "
                     "([128, 256])")


def test_several_problems_are_listed_at_once(bundle):
    _edit(bundle, lambda m: [m.pop("tokenizer"), m["graphs"]["embed"].update(gears=[]),
                             m["generation"].update(top_p="all")])
    out = _refused(bundle, f"{bundle / 'manifest.json'} has 3 problems", "\n  tokenizer is missing",
                   "\n  graphs.embed.gears must be", "\n  generation.top_p must be a finite number")
    assert len([line for line in out.splitlines() if line.strip()]) == 4


@pytest.mark.parametrize("version, message", [
    (None, "schema_version is missing"),
    (99, "schema_version 99 is not supported by this runtime (it reads versions 1, 2)"),
    ("2", "schema_version '2' is not supported"),
], ids=["missing", "unknown", "a-string"])
def test_schema_version_missing_or_unknown(bundle, version, message):
    _edit(bundle, lambda m: m.pop("schema_version") if version is None else m.update(schema_version=version))
    _refused(bundle, f"{bundle / 'manifest.json'}: {message}")


def test_a_damaged_version_1_manifest_is_named(bundle):
    def as_damaged_v1(m):
        m["schema_version"] = 1
        del m["task"]
        m["pipeline"] = "vision,bridge"
    _edit(bundle, as_damaged_v1)
    _refused(bundle, "pipeline must be an object, got 'vision,bridge'")


@pytest.mark.parametrize("data, message", [
    (lambda raw: raw[: len(raw) // 2], "is not valid JSON"),
    (lambda raw: b"\xff\xfe" + raw.decode().encode("utf-16-le"), "is not UTF-8 text (byte 0xff at offset 0)"),
    (lambda raw: b"", "is empty"),
    (lambda raw: b"[" + raw + b"]", "must hold a JSON object, got a list of 1 item"),
], ids=["truncated", "not-utf8", "empty", "a-json-array"])
def test_a_manifest_file_that_is_not_a_manifest(bundle, data, message):
    path = bundle / "manifest.json"
    path.write_bytes(data(path.read_bytes()))
    out = _refused(bundle, str(path), message)
    if message == "is not valid JSON":
        assert "damaged or truncated; re-export the bundle" in out


def test_verify_names_a_damaged_manifest_too(tiny_batch_bundle, tmp_path):
    bundle = copy_bundle(tiny_batch_bundle, tmp_path)
    _edit(bundle, lambda m: m["verification"]["golden"].update(graphs={"embed": "embed/0"}))
    _refused(bundle, "verification.golden.graphs.embed must be a list of objects", command=("verify",),
             args=("--golden", "--out", tmp_path / "reports"))
