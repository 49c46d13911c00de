"""The PyTorch reference pipelines behind `verify --reference` and `bench --baseline torch`, for
every family: LLaVA-1.5 end to end over two turns, a damaged graph and a wrong prompt layout
caught, transformers' Llama carrying the bundle's weights, and the torch baseline's CSV."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from click.testing import CliRunner

from tests.helpers.bundles import copy_bundle, perturb
from vlm2om.exporters.cli.main import main
from vlm2om.exporters.families import make_reference
from vlm2om.exporters.families.llava15 import Reference as LlavaReference
from vlm2om.exporters.families.minigpt4 import Reference as MiniGPT4Reference
from vlm2om.exporters.verify.baseline import hf_llama
from vlm2om.runtime.prompts import fastchat
from vlm2om.runtime.bench import SEED_COLUMNS
from vlm2om.runtime.errors import InputError

VERIFY = ["--prompt", "What is it?", "--new-tokens", "6"]


def _verify(bundle, tmp_path, sample_image, *extra):
    return CliRunner().invoke(main, ["verify", str(bundle), "--reference", "--image", str(sample_image), *VERIFY,
                                     "--out", str(tmp_path), *extra])


def test_llava_reference_verify_over_two_turns(llava_batch_bundle, tmp_path, sample_image):
    r = _verify(llava_batch_bundle, tmp_path, sample_image)
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "verify_llava15.json").read_text())
    assert report["passed"]
    assert {s["graph"] for s in report["subgraphs"]} == {"vision", "projector", "embed", "decoder_0", "decoder_1"}
    first, second = report["end_to_end"]
    assert (first["turn"], second["turn"]) == (1, 2) and second["prompt"] == "Which colours stand out?"
    # The second prompt holds the first question, its 6-token answer and the follow-up.
    assert second["prompt_tokens"] > first["prompt_tokens"] + 6
    for case in (first, second):
        assert case["greedy_agreement"] == case["steps"] == 6 and case["min_cosine"] > 0.99999


def test_llava_reference_catches_a_damaged_projector(llava_batch_bundle, tmp_path, sample_image):
    bundle = copy_bundle(llava_batch_bundle, tmp_path)
    perturb(bundle, "projector", scale=2.0)
    r = _verify(bundle, tmp_path, sample_image, "--single-turn")
    assert r.exit_code == 1
    assert "FAIL subgraph(s) projector" in r.output and "FAIL end-to-end case 0" in r.output


def test_a_wrong_follow_up_layout_is_named(llava_batch_bundle, tmp_path, sample_image, monkeypatch):
    """A runtime that put SentencePiece's dummy prefix after "</s>" (legacy tokenization, which
    LLaVA-1.5's tokenizer does not use) is caught on the second turn, not the first."""
    monkeypatch.setattr(fastchat, "_no_dummy_prefix", lambda tokenizer: tokenizer.sp)
    r = _verify(llava_batch_bundle, tmp_path, sample_image)
    assert r.exit_code == 1
    assert "turn 2" in r.output and "prompt tokens differ after the image" in r.output
    first, second = json.loads((tmp_path / "verify_llava15.json").read_text())["end_to_end"]
    assert first["passed"] and not second["passed"]


def test_llava_reference_tokenizes_with_transformers(llava_batch_bundle, llava_modules):
    """The reference's ids come from transformers' LlamaTokenizer, not the runtime: its legacy flag
    changes the text right after "</s>", and nothing else."""
    manifest = json.loads((llava_batch_bundle / "manifest.json").read_text())
    mods = llava_modules
    turns = [("What is it?", "A cat"), ("Why?", None)]
    ours = LlavaReference(mods, manifest).prompt_ids(turns)
    legacy = LlavaReference(mods, {**manifest, "prompt": {**manifest["prompt"], "legacy": True}}).prompt_ids(turns)
    eos = manifest["tokenizer"]["eos_id"]
    assert ours[0] == legacy[0] and ours[0][0] == manifest["tokenizer"]["bos_id"]
    at = ours[1].index(eos) + 1
    assert ours[1][:at] == legacy[1][:at] and ours[1][at:] != legacy[1][at:]
    assert eos not in ours[0] and ours[1].count(eos) == 1


def test_transformers_llama_carries_the_bundle_weights(tiny_modules, tiny_bundle):
    """The baseline's LlamaForCausalLM gives the logits of our own decoder groups."""
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    embeds = torch.randn(1, 21, tiny_modules.llama.hidden, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf_llama(tiny_modules)(inputs_embeds=embeds).logits[0]
    ours = MiniGPT4Reference(tiny_modules, manifest).logits(embeds[0])
    assert float((theirs - ours).abs().max()) < 1e-4


@pytest.mark.parametrize("bundle, model, length", [("tiny_batch_bundle", "minigpt4", 125),
                                                   ("llava_batch_bundle", "llava15", 160)])
def test_bench_baseline_torch(bundle, model, length, request, tmp_path):
    path = request.getfixturevalue(bundle)
    r = CliRunner().invoke(main, ["bench", str(path), "--batch", "1,2", "--input-lengths", str(length),
                                  "--output-lengths", "5", "--baseline", "torch", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "greedy tokens equal to torch's: 15/15" in r.output  # 5 tokens at batch 1, 2 x 5 at batch 2
    for batch in (1, 2):
        with open(tmp_path / f"{batch}_batch_performance_{model}_torch.csv") as f:
            header, row = list(csv.reader(f))
        assert header[:len(SEED_COLUMNS)] == SEED_COLUMNS and int(float(row[0])) == batch


def test_unknown_family_has_no_reference(tiny_modules, tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    with pytest.raises(InputError, match="no PyTorch reference pipeline for vlmo bundles"):
        make_reference(tiny_modules, {**manifest, "family": "vlmo"})


def test_llava_golden_end_to_end_without_the_reference(llava_batch_bundle, tmp_path):
    bundle = copy_bundle(llava_batch_bundle, tmp_path)
    r = CliRunner().invoke(main, ["verify", str(bundle), "--golden", "--out", str(tmp_path / "ok")])
    assert r.exit_code == 0 and "PASS: 12 subgraph outputs, 1 end-to-end case" in r.output, r.output
    perturb(bundle, "decoder_1", scale=0.5)
    r = CliRunner().invoke(main, ["verify", str(bundle), "--golden", "--out", str(tmp_path / "bad")])
    assert r.exit_code == 1 and "FAIL end-to-end case 0" in r.output


def test_golden_without_room_for_the_end_to_end_case_says_so(tmp_path):
    from vlm2om.exporters.families.minigpt4 import recipe as minigpt4
    from vlm2om.exporters.core.driver import write_bundle
    from vlm2om.exporters.core.extras import ExportExtras

    said = []
    opts = minigpt4.ExportOptions(preset="tiny", cache_gears=(128,))  # the 118-position prompt + 16 > 128
    write_bundle(minigpt4.plan(opts), tmp_path / "b", echo=said.append, extras=ExportExtras(golden=True))
    assert any("no end-to-end case" in s and "largest cache gear 128" in s for s in said)
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "b"), "--golden", "--out", str(tmp_path)])
    assert r.exit_code == 0 and "the golden file has no end-to-end case" in r.output, r.output


def test_llava_reference_without_transformers_says_what_to_install(llava_batch_bundle, monkeypatch, tmp_path):
    import sys

    from vlm2om.exporters.families.llava15 import recipe as llava
    from vlm2om.exporters.core.driver import write_bundle
    from vlm2om.exporters.core.extras import ExportExtras

    manifest = json.loads((llava_batch_bundle / "manifest.json").read_text())
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    with pytest.raises(InputError, match=r"pip install 'vlm2om\[reference\]'"):
        make_reference(None, manifest, b"")
    said = []  # export --golden still works: per-graph cases only, and it says why
    write_bundle(llava.plan(llava.ExportOptions(preset="tiny")), tmp_path / "b", echo=said.append,
                 extras=ExportExtras(golden=True))
    assert any("no end-to-end case" in s and "transformers" in s for s in said)


def test_golden_takes_no_reference_cases(tiny_batch_bundle, tmp_path, sample_image):
    r = CliRunner().invoke(main, ["verify", str(tiny_batch_bundle), "--golden", "--image", str(sample_image)])
    assert r.exit_code == 2 and "the golden end-to-end case is the one stored at export" in r.output
    r = CliRunner().invoke(main, ["verify", str(tiny_batch_bundle), "--reference", "--single-turn",
                                  "--follow-up", "Why?"])
    assert r.exit_code == 2 and "either --follow-up or --single-turn" in r.output


def test_golden_verify_with_low_memory(tiny_batch_bundle, tmp_path, monkeypatch):
    """A bundle larger than the machine (7B on onnxruntime's CPU kernels): every run loads its graph."""
    from vlm2om.runtime import backends

    runs = []
    real = backends.StreamedSession.run
    monkeypatch.setattr(backends.StreamedSession, "run",
                        lambda self, feeds: runs.append(self.name) or real(self, feeds))
    r = CliRunner().invoke(main, ["verify", str(tiny_batch_bundle), "--golden", "--low-memory", "--out", str(tmp_path)])
    assert r.exit_code == 0 and "1 end-to-end case" in r.output, r.output
    assert runs.count("decoder_1") > 16  # the prefill and 15 fed answer tokens, plus the per-graph cases


def test_float16_golden_end_to_end(tmp_path):
    """float16 graphs keep their LayerNorms in fp32 (an EVA slice's first parameter is one): the
    golden case must still run every module in the graph's dtype, and verify within fp16 limits."""
    from vlm2om.exporters.families.minigpt4 import recipe as minigpt4
    from vlm2om.exporters.core.driver import write_bundle
    from vlm2om.exporters.core.extras import ExportExtras

    opts = minigpt4.ExportOptions(preset="tiny", dtype="float16", vision_graphs=2)
    write_bundle(minigpt4.plan(opts), tmp_path / "b", echo=lambda s: None, extras=ExportExtras(golden=True))
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "b"), "--golden", "--out", str(tmp_path)])
    assert r.exit_code == 0 and "1 end-to-end case" in r.output, r.output
    report = json.loads((tmp_path / "verify_minigpt4.json").read_text())
    assert {s["graph"] for s in report["subgraphs"]} >= {"vision_0", "vision_1"}
    assert report["end_to_end"][0]["min_cosine"] > 0.999


def test_an_empty_answer_renders_as_the_runtime_renders_it(llava_batch_bundle, llava_modules, tiny_bundle,
                                                           tiny_modules):
    """FastChat and MiniGPT-4 skip an empty message (``if message``); so do both references."""
    from vlm2om.runtime.prompts import Conversation

    for bundle, mods, make in ((tiny_bundle, tiny_modules, MiniGPT4Reference),
                               (llava_batch_bundle, llava_modules, LlavaReference)):
        manifest = json.loads((bundle / "manifest.json").read_text())
        conv = Conversation(manifest["prompt"])
        conv.add_image()
        conv.ask("What is it?")
        conv.answer("")
        conv.ask("Why?")
        assert make(mods, manifest).prompt_text([("What is it?", ""), ("Why?", None)]) == conv.render()


def test_layout_difference_names_the_place():
    from vlm2om.exporters.verify.cases import layout_difference

    assert layout_difference([[1, 5], [7, 8]], [[1, 5], [7, 8]]) == ""
    assert "after the image at text position 1: bundle [9]" in layout_difference([[1, 5], [7, 9]], [[1, 5], [7, 8]])
    assert "2 text segments, the reference 3" in layout_difference([[1], [2]], [[1], [2], []])


def test_asking_for_cases_picks_the_reference(tiny_batch_bundle, tmp_path):
    """A bundle with a golden file verifies against it by default, but --prompt asks for torch cases."""
    r = CliRunner().invoke(main, ["verify", str(tiny_batch_bundle), "--prompt", "What is it?", "--single-turn",
                                  "--new-tokens", "2", "--out", str(tmp_path)])
    assert r.exit_code == 0 and "against PyTorch" in r.output, r.output
