"""The tiny VisualGLM-6B bundle on the runtime against VisualGLM composed from SwissArmyTransformer
(tests/helpers/visualglm_sat.py) with the same weights: greedy tokens equal for 32 tokens over two
turns, Chinese and English questions in both prompt languages, with newlines and runs of spaces.

The SAT side computes its image embeddings with SAT's ViT and Q-Former, its masks and 2-D positions
from the ids, and recomputes the whole sequence every step; the bundle runs its graphs through the
KV cache, one-chunk prefix-LM prefill and the glm_2d positions. Both take the prompt ids from the
family's torch reference (whose tokenizer rules are written apart from the runtime's)."""
from __future__ import annotations

import json

import pytest

from tests.helpers.visualglm_sat import SatVisualGLM
from vlm2om.exporters.families import get_family
from vlm2om.graphs.eva_vit import EvaVitConfig
from vlm2om.graphs.qformer import QFormerConfig
from vlm2om.runtime import GenerationConfig, open_bundle

STEPS = 32
GREEDY = GenerationConfig(max_new_tokens=STEPS, do_sample=False, stop_on_eos=False, stop_strings=())
QUESTIONS = {
    "zh": [("描述这张图片。", "这张图片\n里有  什么  颜色？"), ("What is in it?", "Say it\nagain,   slowly.")],
    "en": [("Describe the image.", "And the   colours?\nList them."), ("这是什么？", "再说  一遍。\n谢谢")],
}


@pytest.fixture(scope="module", params=["zh", "en"])
def setup(request, visualglm_bundle, visualglm_modules, tmp_path_factory):
    """(language, bundle folder, SAT model, torch reference) with the tiny preset's weights."""
    language = request.param
    bundle = visualglm_bundle
    if language == "en":  # the same seeded weights with the Q:/A: prompt
        from vlm2om.exporters.core.driver import write_bundle

        family = get_family("visualglm")
        bundle = tmp_path_factory.mktemp("bundles") / "visualglm-en"
        write_bundle(family.plan(family.ExportOptions(preset="tiny", language="en")), bundle, echo=lambda s: None)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["prompt"]["roles"] == (["问：", "答："] if language == "zh" else ["Q:", "A:"])
    ref = get_family("visualglm").Reference(visualglm_modules, manifest)
    ids = {p: ref.sp.PieceToId(p) + ref.offset for p in ("[MASK]", "[gMASK]", "<sop>", "<pad>")}
    model = manifest["model"]
    sat = SatVisualGLM.from_reference(visualglm_modules, EvaVitConfig(**model["vision"]),
                                      QFormerConfig(**model["qformer"]), ids)
    return language, bundle, sat, ref


@pytest.mark.parametrize("pair", [0, 1])
def test_two_turns_greedy_equal_sat(setup, sample_image, pair):
    language, bundle, sat, ref = setup
    first, second = QUESTIONS[language][pair]
    chat = open_bundle(bundle).chat(sample_image)
    pixels = ref.pixels(sample_image)
    turns = []
    for question in (first, second):
        "".join(chat.ask(question, GREEDY))
        before, after = ref.prompt_ids([*turns, (question, None)])
        assert chat.last.prompt_tokens == len(before) + 32 + len(after)
        want = sat.greedy(pixels, before, after, STEPS)
        got = chat.last.tokens
        i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), None)
        assert got == want, f"{language} turn {len(turns) + 1}: first mismatch at step {i}"
        turns.append((question, chat.conv.messages[-1][1]))  # the answer text the next prompt holds
    assert chat.last.reused_tokens == 0  # a prefix-LM turn is prefilled afresh
