"""The bundle on onnxruntime produces the PyTorch reference pipeline's greedy tokens.

The reference recomputes the whole sequence each step with the torch modules (no cache,
no gears, no padding); the runtime prefills in padded gear chunks and decodes with the
KV cache, moving to the next cache gear on the way.
"""
from __future__ import annotations

import dataclasses

import json

from click.testing import CliRunner

from vlm2om.exporters.cli.main import main
from vlm2om.exporters.families.minigpt4 import Reference as MiniGPT4Reference
from vlm2om.runtime import GenerationConfig, open_bundle
from vlm2om.runtime.batch import generate_batch

NEW_TOKENS = 40
GREEDY = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, stop_on_eos=False, stop_strings=())


def _first_mismatch(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def test_greedy_tokens_match_torch_reference(tiny_bundle, tiny_modules, sample_image):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    ref = MiniGPT4Reference(tiny_modules, manifest)
    question = "Describe this image in detail."
    expected, margins = ref.greedy(sample_image, [(question, None)], NEW_TOKENS)

    chat = open_bundle(tiny_bundle).chat(sample_image)
    list(chat.ask(question, GREEDY))
    got = chat.last
    i = _first_mismatch(got.tokens, expected)
    assert got.tokens == expected, f"first mismatch at step {i} (reference margin {margins[i]:.2e})"

    seq_gears = sorted({g["seq"] for g in manifest["graphs"]["decoder_0"]["gears"]})
    cache_gears = manifest["kv_cache"]["capacity_gears"]
    # The prompt spans several prefill chunks and the last one is padded.
    assert got.prompt_tokens > seq_gears[-1] and got.prompt_tokens % seq_gears[-1] not in seq_gears
    # The decode crossed a cache gear: started under the first, finished above it.
    assert got.prompt_tokens < cache_gears[0] < got.prompt_tokens + NEW_TOKENS
    assert chat.cache.capacity == cache_gears[1]
    assert len(manifest["pipeline"]["decoder_graphs"]) == 2  # two stitched layer groups


def test_second_turn_matches_reference_and_reuses_cache(tiny_bundle, tiny_modules, sample_image):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    ref = MiniGPT4Reference(tiny_modules, manifest)
    chat = open_bundle(tiny_bundle).chat(sample_image)
    cfg = GREEDY.but(max_new_tokens=8)
    list(chat.ask("What is it?", cfg))
    first = chat.last.text
    list(chat.ask("And the colour?", cfg))
    expected, _ = ref.greedy(sample_image, [("What is it?", first), ("And the colour?", None)], 8)
    assert chat.last.tokens == expected
    assert chat.last.reused_tokens > 32  # system prompt and image stayed in the cache


def test_stop_string_and_streaming(tiny_bundle, sample_image):
    pipe = open_bundle(tiny_bundle)
    chat = pipe.chat(sample_image)
    pieces = list(chat.ask("Describe this image.", GREEDY.but(max_new_tokens=24)))
    assert "".join(pieces).strip() == chat.last.text
    decoded = pipe.tokenizer.decode(chat.last.tokens).strip()
    assert decoded.startswith(chat.last.text)
    # A stop string taken from the middle of the answer cuts the text there and ends generation.
    mid = len(decoded) // 2
    stop = next(decoded[i:i + 2] for i in range(mid, len(decoded) - 1) if not decoded[i:i + 2].isspace())
    chat2 = pipe.chat(sample_image)
    text = "".join(chat2.ask("Describe this image.", GREEDY.but(max_new_tokens=24, stop_strings=(stop,))))
    assert chat2.last.finish_reason == "stop" and stop not in text
    assert decoded.startswith(text.strip()) and len(text.strip()) < len(decoded)


def test_bundle_whose_last_group_returns_every_position(tmp_path, tiny_opts, tiny_bundle, sample_image):
    """A bundle exported before ``logits_index`` (last group: logits [B, S, V]) still runs, with
    the tokens of one that has it; and its output really is every position's."""
    from vlm2om.exporters.families.minigpt4 import recipe as minigpt4
    from vlm2om.exporters.core.driver import write_bundle

    plan = minigpt4.plan(tiny_opts)
    last = plan.subgraphs[-1]
    last.inputs = [d for d in last.inputs if d.name != "logits_index"]  # the module then returns [B, S, V]
    make = last.make_inputs
    last.make_inputs = lambda gear, gen: {k: v for k, v in make(gear, gen).items() if k != "logits_index"}
    vocab = last.outputs[0].dims[-1]
    last.outputs[0] = dataclasses.replace(last.outputs[0], dims=("batch", "seq", vocab))
    old = open_bundle(write_bundle(plan, tmp_path / "old", echo=lambda s: None).root)
    assert old.bundle.graph(last.name)["outputs"][0]["shape"] == [1, "seq", vocab]
    answers, batched = [], []
    for pipe in (old, open_bundle(tiny_bundle)):
        chat = pipe.chat(sample_image)
        list(chat.ask("What is it?", GREEDY.but(max_new_tokens=12)))
        answers.append(chat.last.tokens)
        res = generate_batch(pipe, [sample_image], ["What is it?"], [GREEDY.but(max_new_tokens=12)])
        batched.append(res.sequences[0].tokens)
    assert answers[0] == answers[1] == batched[0] == batched[1]
    # verify --reference rebuilds today's graphs: it names the difference instead of comparing shapes
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "old"), "--reference", "--out", str(tmp_path)])
    assert r.exit_code == 1 and "comes from an older vlm2om" in r.output and "logits_index" in r.output
