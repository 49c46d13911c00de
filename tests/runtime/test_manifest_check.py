"""The manifest schema check (runtime/manifest_check.py) and the graph-file check of the backends:
exported manifests pass, every damaged key is named by its path, and no edit of any key makes the
check itself (or the version 1 upgrade) fail with anything but a BundleError."""
from __future__ import annotations

import copy
import json

import pytest

from tests.helpers.bundles import as_version_1
from vlm2om.runtime.backends.base import FileTensor, TensorSpec, io_problems
from vlm2om.runtime.bundle import Bundle, read_manifest
from vlm2om.runtime.errors import BundleError
from vlm2om.runtime.manifest_check import MAX_SHOWN, check_manifest, manifest_problems
from vlm2om.runtime.schema import upgrade

WHERE = "bundle/manifest.json"
DELETE = object()
BAD_VALUES = [DELETE, None, "abc", -1, 0, 1.5, [], {}, ["x"], [{}], True, "seq"]


@pytest.fixture(scope="module")
def manifest(tiny_bundle) -> dict:
    return json.loads((tiny_bundle / "manifest.json").read_text())


def _paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*path, i))


def _set(m, path, value):
    obj = m
    for key in path[:-1]:
        obj = obj[key]
    if value is DELETE:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


def _problems(m: dict) -> str:
    with pytest.raises(BundleError) as e:
        check_manifest(upgrade(m, WHERE), WHERE)
    return str(e.value)


def test_exported_manifests_pass(tiny_bundle, llava_bundle, tiny_batch_bundle):
    for b in (tiny_bundle, llava_bundle, tiny_batch_bundle):
        m = json.loads((b / "manifest.json").read_text())
        assert manifest_problems(m) == [], b
        assert manifest_problems(upgrade(as_version_1(copy.deepcopy(m)), WHERE)) == [], b


@pytest.mark.parametrize("version", [2, 1])
def test_no_edit_of_any_key_escapes_as_another_exception(manifest, version):
    """Every key path of the tiny manifest (and of its version 1 form) set to each wrong value:
    the upgrade and the check either accept it or raise a BundleError, never KeyError & co."""
    base = manifest if version == 2 else as_version_1(copy.deepcopy(manifest))
    tried, text = 0, json.dumps(base)
    for path in _paths(base):
        if not path or (path[0] in ("model", "provenance", "atc", "special_tokens") and len(path) > 1
                        or len(path) > 3 and path[2] == "verification"):  # read by no check beyond its type
            continue
        for value in BAD_VALUES:
            m = json.loads(text)  # a fresh copy, faster than deepcopy
            _set(m, path, value)
            tried += 1
            try:
                check_manifest(upgrade(m, WHERE), WHERE)
            except BundleError:
                pass
    assert tried > 1500


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("kv_cache"), "bundle/manifest.json: kv_cache is missing"),
    (lambda m: m["graphs"]["decoder_0"]["inputs"][2].update(shape="abc"),
     "bundle/manifest.json: graphs.decoder_0.inputs[2].shape must be a list, got 'abc'"),
    (lambda m: m["graphs"]["embed"].update(gears=[]), "graphs.embed.gears must be a non-empty list"),
    (lambda m: m["graphs"]["embed"].update(gears=["1", "16"]), "graphs.embed.gears[0] must be an object"),
    (lambda m: m["graphs"]["embed"]["gears"][1].update(seq=0), "graphs.embed.gears[1].seq must be a positive"),
    (lambda m: m["graphs"]["embed"]["gears"][1].update(sequence=4), "graphs.embed.gears[1] names sequence, which no"),
    (lambda m: m["graphs"]["embed"]["gears"][0].pop("seq"), "graphs.embed.gears[0] gives no value for gear dim seq"),
    (lambda m: m["graphs"]["vision"]["inputs"][0].update(dtype="float8"), "dtype must be one of float32"),
    (lambda m: m["graphs"]["vision"].update(file="other.onnx"), "names 'other.onnx', which files does not list"),
    (lambda m: m["graphs"]["vision"].update(file="../x.onnx"), "vision.file must be a relative path inside"),
    (lambda m: m["files"]["vision.onnx"].update(sha256="xyz"), "files['vision.onnx'].sha256 must be 64 lowercase"),
    (lambda m: m["pipeline"].update(embed_graph="embedding"), "pipeline.embed_graph names graph 'embedding'"),
    (lambda m: m["pipeline"]["decoder_graphs"].append("decoder_0"), "names graph 'decoder_0' a second time"),
    (lambda m: m["pipeline"].update(image_output="nothing"), "pipeline.image_output is 'nothing'"),
    (lambda m: m["graphs"]["bridge"]["inputs"][0].update(name="feats"), "is 'feats', which is neither"),
    (lambda m: m["graphs"]["decoder_0"]["inputs"][1].pop("role"), "('position_ids') has no role"),
    (lambda m: m["graphs"]["decoder_0"]["inputs"][1].update(role="positions_3d"), "has role 'positions_3d'"),
    (lambda m: m["graphs"]["decoder_1"]["outputs"].pop(0), "graphs.decoder_1 has no tensor with role 'logits'"),
    (lambda m: m["graphs"]["decoder_0"]["inputs"][2].update(dtype="float16"), "the runtime gives role 'valid_mask'"),
    (lambda m: m["kv_cache"].update(kv_heads=8), "kv_cache's group_layers, kv_heads and head_dim make it"),
    (lambda m: m["kv_cache"].update(kind="paged"), "kv_cache.kind is 'paged'"),
    (lambda m: m["kv_cache"].update(capacity_gears=[128, 512]), "kv_cache.capacity_gears [128, 512] are not"),
    (lambda m: m["kv_cache"].update(group_layers=[2]), "kv_cache.group_layers has 1 groups"),
    (lambda m: m["tokenizer"].update(eos_ids=[9999]), "tokenizer.eos_ids holds id 9999, outside the 512 logits"),
    (lambda m: m["tokenizer"].pop("file"), "tokenizer.file is missing"),
    (lambda m: m["prompt"].update(kind="chatml"), "prompt kind 'chatml'"),
    (lambda m: m["prompt"].pop("image_placeholder"), "prompt.image_placeholder is missing"),
    (lambda m: m["pipeline"].update(attention="sliding"), "attention kind 'sliding'"),
    (lambda m: m["generation"].update(temperature="hot"), "generation.temperature must be a finite number"),
    (lambda m: m["generation"].update(top_p=2.0), "generation is refused: top_p must be in (0, 1]"),
    (lambda m: m["preprocess"]["steps"][1].update(interpolation="lanczos"), "interpolation must be one of"),
    (lambda m: m["preprocess"]["steps"].pop(0), "needs an rgb step before to_float"),
    (lambda m: m["preprocess"]["steps"].append({"op": "sharpen"}), "'sharpen' is not a preprocessing step"),
    (lambda m: m["verification"].update(thresholds_by_dtype={"float32": {"cosine": "high"}}),
     "verification.thresholds_by_dtype.float32 must be"),
    (lambda m: m.update(schema_version="2"), "schema_version '2' is not supported"),
    (lambda m: m.pop("schema_version"), "schema_version is missing"),
])
def test_each_problem_is_named_by_its_key_path(manifest, change, message):
    m = copy.deepcopy(manifest)
    change(m)
    assert message in _problems(m)


def test_several_problems_are_listed_at_once(manifest):
    m = copy.deepcopy(manifest)
    for key in ("tokenizer", "prompt", "generation"):
        del m[key]
    m["graphs"]["embed"]["gears"] = []
    text = _problems(m)
    assert text.startswith(f"{WHERE} has 4 problems")
    assert all(f"\n  {key} is missing" in text for key in ("tokenizer", "prompt", "generation"))
    for g in m["graphs"].values():  # many: the first MAX_SHOWN, then a count
        for spec in g["inputs"] + g["outputs"]:
            spec["shape"] = "abc"
    text = _problems(m)
    count = int(text.split(" has ")[1].split()[0])
    assert count > MAX_SHOWN and text.endswith(f"\n  ... and {count - MAX_SHOWN} more")
    assert len(text.splitlines()) == MAX_SHOWN + 2


def test_a_damaged_version_1_manifest_is_named(manifest):
    m = as_version_1(copy.deepcopy(manifest))
    m["pipeline"] = ["vision"]
    assert "pipeline must be an object, got [\"vision\"]" in _problems(m)
    m = as_version_1(copy.deepcopy(manifest))
    m["graphs"]["vision"]["inputs"] = {}
    assert "graphs.vision.inputs must be a list" in _problems(m)


@pytest.mark.parametrize("data, message", [
    (b"", "is empty"),
    (b"  \n", "is empty"),
    (b'{"schema_version": 2, "files": {', "is not valid JSON (Expecting"),
    (b"\xff\xfe{}", "is not UTF-8 text (byte 0xff at offset 0)"),
    (b"[1, 2]", "must hold a JSON object, got [1, 2]"),
    (b"[" * 100000 + b"]" * 100000, "nests too deeply"),
])
def test_unreadable_manifest_files(tmp_path, data, message):
    (tmp_path / "manifest.json").write_bytes(data)
    with pytest.raises(BundleError) as e:
        read_manifest(tmp_path / "manifest.json")
    assert message in str(e.value) and str(tmp_path / "manifest.json") in str(e.value)


def test_a_byte_order_mark_is_read(tmp_path):
    (tmp_path / "manifest.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"schema_version": 2}).encode())
    assert read_manifest(tmp_path / "manifest.json") == {"schema_version": 2}


def test_unlisted_files(tiny_bundle, tmp_path):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    assert Bundle.open(b).unlisted_files() == []
    (b / "notes.txt").write_text("mine")
    (b / "om").mkdir()
    (b / "om" / "old.om").write_bytes(b"x")
    assert Bundle.open(b).unlisted_files() == ["notes.txt", "om/old.om"]


def _spec(name, shape, dtype="float32"):
    return TensorSpec(name, dtype, tuple(shape))


@pytest.mark.parametrize("actual, problem", [
    ([FileTensor("x", "float32", (1, None, 4))], None),  # a gear dim dynamic in the file
    ([FileTensor("x", "float32", (1, "s", 4))], None),
    ([FileTensor("x", "float32", (None, None, 4))], None),  # a static dim dynamic in the file: fed exactly
    ([FileTensor("x", "float32", (1, 16, 4))], "input 'x' is float32[1,16,4] in the file, the manifest declares "
                                               "float32[1,seq,4]"),  # a gear dim of two values fixed
    ([FileTensor("x", "float32", (1, None, 8))], "input 'x' is float32[1,?,8] in the file"),
    ([FileTensor("x", "float16", (1, None, 4))], "input 'x' is float16[1,?,4] in the file"),
    ([FileTensor("x", "float32", (1, None))], "input 'x' is float32[1,?] in the file"),
    ([FileTensor("y", "float32", (1, None, 4))], "the file has inputs ['y'], the manifest declares ['x']"),
])
def test_graph_file_against_its_manifest_entry(actual, problem):
    problems = io_problems("input", [_spec("x", (1, "seq", 4))], actual, [{"seq": 1}, {"seq": 16}])
    assert problems == ([] if problem is None else [problems[0]])
    if problem:
        assert problems[0].startswith(problem)


def test_a_gear_dim_with_one_value_may_be_static_in_the_file():
    one = [{"seq": 16}]
    assert io_problems("input", [_spec("x", (1, "seq"))], [FileTensor("x", "float32", (1, 16))], one) == []
    assert io_problems("input", [_spec("x", (1, "seq"))], [FileTensor("x", "float32", (1, 8))], one)
    # OM files: dtypes unknown, gear dims reported at a value, outputs possibly flat
    assert io_problems("output", [_spec("x", (1, "seq", 4))], [FileTensor("o", None, (64,))], one,
                       by_name=False, ranks_may_differ=True, strict_gears=False) == []


def test_the_chatglm_tokenizer_and_glm_prompt_entries_are_checked(manifest):
    m = copy.deepcopy(manifest)
    m["tokenizer"].update(kind="chatglm_sentencepiece", max_blank=0)
    m["prompt"] = {"kind": "glm_qa", "roles": ["问：", "答："], "sep": "\n", "image_close": "</img>",
                   "suffix": ["[gMASK]", "<sop>"]}
    problems = manifest_problems(m)
    assert any(p.startswith("tokenizer.id_offset") for p in problems), problems
    assert any(p.startswith("tokenizer.max_blank") for p in problems), problems
    assert any(p.startswith("prompt.image_open") for p in problems), problems
    m["tokenizer"].update(id_offset=0, max_blank=80)
    m["prompt"]["image_open"] = "<img>"
    assert manifest_problems(m) == []


@pytest.fixture(scope="module")
def hd_manifest(ixc2_4khd_bundle) -> dict:
    return json.loads((ixc2_4khd_bundle / "manifest.json").read_text())


def test_the_hd_grid_assembly_passes_and_every_key_edit_is_a_bundle_error(hd_manifest):
    assert manifest_problems(hd_manifest) == []
    text = json.dumps(hd_manifest)
    for path in [p for p in _paths(hd_manifest) if p[:2] == ("pipeline", "image_assembly") or p[:3] == (
            "preprocess", "steps", 1)]:
        for value in BAD_VALUES:
            m = json.loads(text)
            _set(m, path, value)
            try:
                check_manifest(upgrade(m, WHERE), WHERE)
            except BundleError:
                pass


@pytest.mark.parametrize("change, message", [
    (lambda m: m["pipeline"]["image_assembly"].update(kind="tiles"), "pipeline.image_assembly.kind is 'tiles'"),
    (lambda m: m["pipeline"]["image_assembly"].update(row_separator_row=6),
     "pipeline.image_assembly.row_separator_row is 6, but 'view_embeds' has 6 rows per view"),
    (lambda m: m["pipeline"]["image_assembly"].update(tokens_per_side=3), "tokens_per_side is 3: 9 tokens"),
    (lambda m: m["pipeline"]["image_assembly"].update(global_resize="bilinear"), "bicubic only"),
    (lambda m: m["pipeline"].update(image_tokens=111), "pipeline.image_tokens is 111"),
    (lambda m: m["pipeline"].pop("image_assembly"), "pipeline.image_assembly does not say how to lay them out"),
    (lambda m: m["preprocess"]["steps"].pop(1), "preprocess.steps has no hd_transform step"),
    (lambda m: m["preprocess"]["steps"][1].update(size=57), "preprocess.steps[1].size is 57, but"),
    (lambda m: m["preprocess"]["steps"][1].update(hd_num=0), "preprocess.steps[1].hd_num"),
])
def test_hd_grid_problems_are_named(hd_manifest, change, message):
    m = copy.deepcopy(hd_manifest)
    change(m)
    assert message in _problems(m)
