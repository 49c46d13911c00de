"""The LLaVA-1.5 recipe's tiny preset through the whole path: export, the manifest contract, the
ATC lint, the fake ATC + ais_bench stand-in (same tokens as onnxruntime), chat, and the CLI that
``make export MODEL=llava15`` runs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import ROOT, run_cli
from tests.helpers.om_compare import om_and_ort_answers
from tests.helpers.templates import LLAVA_V1, VICUNA_V1
from vlm2om.exporters.families import FAMILIES
from vlm2om.exporters.families.llava15 import recipe as llava
from vlm2om.exporters.ascend.lint import keep_dtype_plan, lint_path
from vlm2om.runtime import Bundle, GenerationConfig, InputError, open_bundle

GREEDY = GenerationConfig(max_new_tokens=12, stop_on_eos=False)


def test_manifest_records_llava_eval_settings(llava_bundle):
    m = Bundle.open(llava_bundle).manifest
    assert FAMILIES["llava15"].module == "vlm2om.exporters.families.llava15"
    assert (m["family"], m["variant"], m["dtype"]) == ("llava15", "tiny", "float32")
    assert list(m["graphs"]) == ["vision", "projector", "embed", "decoder_0", "decoder_1"]
    assert m["pipeline"]["image_graphs"] == ["vision", "projector"] and m["pipeline"]["image_tokens"] == 16
    g = m["graphs"]
    assert g["vision"]["inputs"][0]["shape"] == [1, 3, 56, 56]
    assert g["vision"]["outputs"][0]["shape"] == g["projector"]["inputs"][0]["shape"] == [1, 16, 32]
    assert g["projector"]["outputs"][0]["shape"] == [1, 16, 64]
    assert g["decoder_1"]["outputs"][0]["shape"] == [1, 576]  # tokenizer 512 + 64 rows, one position
    assert m["prompt"] == llava.PROMPTS["vicuna_v1"] and m["prompt"]["bos"] == "first"
    # The templates whose rendering and tokenization tests/runtime/test_prompts.py checks against FastChat / LLaVA.
    assert llava.PROMPTS == {"vicuna_v1": VICUNA_V1, "llava_v1": LLAVA_V1}
    assert m["generation"] == {"max_new_tokens": 1024, "do_sample": False}
    steps = [s["op"] for s in m["preprocess"]["steps"]]
    assert steps == ["rgb", "pad_to_square", "resize_shortest", "center_crop", "to_float", "normalize"]
    assert m["preprocess"]["steps"][1]["fill"] == [122, 116, 104]
    assert m["model"]["image_token_index"] == 512 and m["model"]["vision"]["select_layer"] == -2
    assert m["provenance"]["options"]["template"] == "vicuna_v1"
    assert m["kv_cache"]["capacity_gears"] == [128, 256]


def test_templates_and_real_size_defaults():
    plan = llava.plan(llava.ExportOptions(preset="tiny", template="llava_v1"))
    assert "curious human" in plan.manifest["prompt"]["system"]
    assert plan.provenance["options"]["template"] == "llava_v1"
    with pytest.raises(InputError, match="unknown LLaVA prompt template 'v2'.*vicuna_v1"):
        llava.ExportOptions(template="v2")
    real = llava.gear_options(llava.ExportOptions(preset=None, checkpoint=Path("x")))
    assert (real.seq, real.cache) == ((1, 32, 128, 512), (1024, 2048))
    assert 576 + 40 + 1024 <= max(real.cache)  # image + a prompt + the answer cap fit the cache
    assert llava.ExportOptions(checkpoint=Path("x")).export_dtype == "float16"


def test_lints_clean_with_fp32_layernorms_planned(llava_bundle):
    findings = lint_path(llava_bundle)
    assert [f for f in findings if f.severity != "info"] == []
    plan = keep_dtype_plan(findings)
    assert any("layer_norm1" in n or "pre_layrnorm" in n for n in plan["vision"]), plan["vision"]
    assert any("Softmax" in n for n in plan["vision"])


def test_chat_two_turns(llava_bundle, sample_image):
    pipe = open_bundle(llava_bundle)
    assert pipe.defaults.do_sample is False and pipe.defaults.max_new_tokens == 1024
    chat = pipe.chat(sample_image)
    first = "".join(chat.ask("What is in the picture?", GREEDY))
    assert first.strip() == chat.last.text and chat.last.finish_reason == "length"
    assert chat.last.prompt_tokens == len(chat.cached_keys) - len(chat.last.tokens) + 1
    list(chat.ask("And its colour?", GREEDY))
    assert chat.last.reused_tokens > 16  # the system prompt and the image stayed in the cache
    # The first answer ends with sep2 "</s>" in the second prompt: the EOS token, not its characters.
    assert chat.cached_keys[:chat.last.prompt_tokens].count(2) == 1


def test_om_stand_in_gives_the_same_tokens_as_onnxruntime(llava_bundle, tmp_path, monkeypatch, sample_image):
    answers, modes, sessions = om_and_ort_answers(llava_bundle, tmp_path, monkeypatch, sample_image,
                                                  ("What is in the picture?", "And its colour?"), GREEDY)
    assert answers["om"] == answers["ort"] and all(answers["om"])
    assert modes["vision"] == modes["projector"] == "static" and modes["decoder_0"] == "dymdims"


def test_cli_export_and_run_as_make_export_does(tmp_path, sample_image):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "llava15"
    r = run_cli("export", "llava15", "--preset", "tiny", "--out", out, env=env)
    assert r.returncode == 0, r.stderr
    r = run_cli("run", out, "--image", sample_image, "--prompt", "Describe this image.", "--max-new-tokens", "8",
                "--stats", env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "backend ort" in r.stderr and "prompt" in r.stderr
