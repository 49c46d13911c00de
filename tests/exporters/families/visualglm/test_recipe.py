"""The VisualGLM-6B recipe's tiny preset through the whole path: the manifest contract, the ATC
lint, the fake ATC + ais_bench stand-in (same tokens as onnxruntime), the one-chunk prefix-LM
prefill, and the CLI as ``make export MODEL=visualglm`` runs it, then verify and bench."""
from __future__ import annotations


import pytest

from tests.helpers.cli_flow import export_run_chat_verify_bench
from tests.helpers.om_compare import om_and_ort_answers
from vlm2om.exporters.ascend.lint import lint_path
from vlm2om.exporters.families.visualglm import recipe
from vlm2om.runtime import Bundle, GenerationConfig, InputError, open_bundle

GREEDY = GenerationConfig(max_new_tokens=12, do_sample=False, stop_on_eos=False, stop_strings=())


def test_manifest_and_graphs(visualglm_bundle):
    m = Bundle.open(visualglm_bundle).manifest
    assert (m["family"], m["variant"], m["dtype"]) == ("visualglm", "tiny", "float32")
    assert list(m["graphs"]) == ["vision", "bridge", "embed", "decoder_0", "decoder_1"]
    p = m["pipeline"]
    assert p["image_tokens"] == 32 and p["attention"] == "prefix_lm" and p["positions"] == {"kind": "glm_2d"}
    roles = {s["role"]: s["shape"] for s in m["graphs"]["decoder_0"]["inputs"]}
    assert roles["positions_2d"] == [1, 2, "seq"] and roles["past_kv"] == [1, 2, 1, 4, "cache", 16]
    assert m["graphs"]["bridge"]["outputs"][0]["shape"] == [1, 32, 64]
    assert [f for f in lint_path(visualglm_bundle) if f.severity != "info"] == []


def test_real_gears_hold_a_context_in_one_chunk():
    """ATC: four dynamic dims per gear (stacked cache) and 24 gears; the largest seq gear holds a
    1024-position context (VisualGLM's max_length), prefilled in one chunk."""
    g = recipe.REAL_GEARS
    assert (g.kv_layout, max(g.seq), len(g.seq) * len(g.cache)) == ("stacked", 1024, 24)


def test_a_context_longer_than_the_largest_seq_gear_is_refused(visualglm_bundle, sample_image):
    chat = open_bundle(visualglm_bundle).chat(sample_image)
    with pytest.raises(InputError, match="one chunk"):
        "".join(chat.ask("一" * 300, GREEDY))


def test_om_stand_in_gives_the_same_tokens_as_onnxruntime(visualglm_bundle, tmp_path, monkeypatch, sample_image):
    answers, modes, sessions = om_and_ort_answers(visualglm_bundle, tmp_path, monkeypatch, sample_image,
                                                  ("描述这张图片。", "What else?"), GREEDY)
    assert answers["om"] == answers["ort"]
    assert modes["vision"] == modes["bridge"] == "static" and modes["decoder_0"] == "dymdims"


def test_cli_export_run_chat_verify_bench(tmp_path, sample_image):
    export_run_chat_verify_bench("visualglm", tmp_path, sample_image, "描述这张图片。", "And in English?")
