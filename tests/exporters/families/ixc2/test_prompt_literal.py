"""InternLM-XComposer2-VL's prompt, tokenizer entry, generation defaults and preprocessing in the
tiny bundle's manifest, written out here from the original code (``interleav_wrap_chat``,
``chat``'s defaults, the VL ``vis_processor``) and NOT from the recipe's constants: the runtime and
the torch reference both read the recipe, so a typo there would pass the others."""
from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image

from tests.helpers.images import synthetic_image
from tests.helpers.ixc2_original import META
from vlm2om.runtime import open_bundle
from vlm2om.runtime.preprocess import preprocess
from vlm2om.runtime.prompts import Conversation

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """The tiny VL bundle, exported through the family package (not yet in the CLI's registry)."""
    import importlib

    from vlm2om.exporters.core.driver import write_bundle

    family = importlib.import_module("vlm2om.exporters.families.ixc2.vl")
    out = tmp_path_factory.mktemp("bundles") / "ixc2-vl-tiny"
    write_bundle(family.plan(family.ExportOptions(preset="tiny")), out, echo=lambda s: None)
    return out


def manifest_of(bundle) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_chat_prompt_with_history(bundle):
    """interleav_wrap_chat: the meta message, each past turn, the query, the open assistant turn."""
    c = Conversation(manifest_of(bundle)["prompt"])
    c.add_image()
    c.ask("Describe it.")
    c.answer("A cat.")
    c.ask("Where  is it?\nSay")
    want = (f"[UNUSED_TOKEN_146]system\n{META}[UNUSED_TOKEN_145]\n"
            "[UNUSED_TOKEN_146]user\n<ImageHere>Describe it.[UNUSED_TOKEN_145]\n"
            "[UNUSED_TOKEN_146]assistant\nA cat.[UNUSED_TOKEN_145]\n"
            "[UNUSED_TOKEN_146]user\nWhere  is it?\nSay[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n")
    assert c.render() == want
    assert c.segments() == want.split("<ImageHere>")


def test_every_text_part_has_bos_and_the_chat_pieces_are_their_ids(bundle):
    """Each part through the tokenizer with add_special_tokens (BOS 1 first), the added tokens split
    out and the text between SentencePiece-encoded chunk by chunk (written out by hand here)."""
    m = manifest_of(bundle)
    sp = spm.SentencePieceProcessor(model_file=str(bundle / "tokenizer.model"))
    begin, end = sp.PieceToId("[UNUSED_TOKEN_146]"), sp.PieceToId("[UNUSED_TOKEN_145]")
    assert m["tokenizer"] == {"kind": "sentencepiece", "file": "tokenizer.model", "bos_id": 1, "eos_id": 2,
                              "eos_ids": [2, end]}
    chat = open_bundle(bundle).chat(synthetic_image(64, 48, seed=1))
    c = Conversation(m["prompt"])
    c.add_image()
    c.ask("Hi there")
    before, after = c.tokenize(chat.pipe.tokenizer)
    enc = sp.EncodeAsIds
    assert before == [1, begin, *enc("system\n" + META), end, *enc("\n"), begin, *enc("user\n")]
    assert after == [1, *enc("Hi there"), end, *enc("\n"), begin, *enc("assistant\n")]


def test_generation_defaults_and_answer(bundle):
    """chat(): do_sample, temperature 1.0, top_p 0.8, repetition_penalty 1.005, max_new_tokens 1024;
    eos [2, [UNUSED_TOKEN_145]]; the answer is the text before the first [UNUSED_TOKEN_145], unstripped."""
    m = manifest_of(bundle)
    assert m["generation"] == {"max_new_tokens": 1024, "do_sample": True, "temperature": 1.0, "top_p": 0.8,
                               "repetition_penalty": 1.005}
    assert m["pipeline"]["attention"] == "causal"
    assert Conversation(m["prompt"]).clean(" A cat [UNUSED_TOKEN_145] more") == " A cat "


def test_vl_preprocessing_is_resize_totensor_normalize(bundle):
    """vis_processor: Resize((S, S), BICUBIC), ToTensor, Normalize(CLIP) (S = 490 at real size)."""
    m = manifest_of(bundle)
    size = m["model"]["vision"]["image_size"]
    for w, h in [(173, 61), (70, 70), (300, 500)]:
        img = synthetic_image(w, h, seed=w)
        want = (np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC), np.float32) / 255.0 - MEAN) / STD
        np.testing.assert_allclose(preprocess(img, m["preprocess"]["steps"]), want.transpose(2, 0, 1)[None],
                                   rtol=0, atol=1e-5)


def test_greedy_answer_two_turns_matches_the_family_reference(bundle):
    """The runtime (chunked prefill, cache reuse on the second turn, PLoRA on the image rows only,
    positions counted in the graph) against the whole-sequence torch recompute of the same modules."""
    import importlib

    from vlm2om.exporters.families.ixc2.reference import Ixc2Reference
    from vlm2om.runtime.generation import GenerationConfig

    family = importlib.import_module("vlm2om.exporters.families.ixc2.vl")
    ref = Ixc2Reference(family.build_modules(family.ExportOptions(preset="tiny")), manifest_of(bundle))
    image = synthetic_image(90, 60, seed=3)
    cfg = GenerationConfig(max_new_tokens=32, do_sample=False, stop_on_eos=False, stop_strings=())
    chat, turns = open_bundle(bundle).chat(image), []
    for question in ("Describe this image.", "And the colours?"):
        "".join(chat.ask(question, cfg))
        turns.append((question, None))
        expected, _ = ref.greedy(image, turns, 32)
        assert chat.last.tokens == expected
        assert ref.prompt_ids(turns) == chat.last.layout.segments
        turns[-1] = (question, chat.last.text)
    assert chat.last.reused_tokens > 0
