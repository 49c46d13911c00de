"""MiniGPT-4's prompt, tokenization, stopping and preprocessing, written out here from the
original code (conversation.py's CONV_VISION_Vicuna0, minigpt_base.get_context_emb, demo.py,
blip_processors.Blip2ImageEvalProcessor) and NOT from the recipe's constants: the runtime and
the torch reference both read the recipe's PROMPT, so a typo there would pass every other test.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image

from tests.helpers.images import synthetic_image
from tests.helpers.templates import two_turns
from vlm2om.runtime.preprocess import preprocess
from vlm2om.runtime.prompts import clean_answer

SYSTEM = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I "
          "provide it to you. Please answer my questions.")
# SINGLE style, sep "###", roles "Human: " / "Assistant: "; upload_img's message, then ask() joins the
# question with " " because the last message ends with "</Img>"; the open turn is the bare role.
FIRST = SYSTEM + "###Human: <Img><ImageHere></Img> What is this?###Assistant: "
SECOND = (SYSTEM + "###Human: <Img><ImageHere></Img> What is this?###Assistant: A cat.###Human: Its colour?"
          "###Assistant: ")
# Blip2ImageEvalProcessor: Resize((224, 224), BICUBIC), ToTensor, Normalize(CLIP's mean and std).
SIZE = 224
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


@pytest.fixture(scope="module")
def manifest(tiny_bundle):
    return json.loads((tiny_bundle / "manifest.json").read_text())


def test_vicuna0_prompt_text(manifest):
    conv, first, second = two_turns(manifest["prompt"])
    assert first == FIRST
    assert second == SECOND
    assert conv.segments() == SECOND.split("<ImageHere>")  # get_context_emb splits at the image


def test_segments_tokenized_alone_with_bos_on_the_first(manifest, tiny_bundle):
    """get_context_emb: each segment through the LlamaTokenizer on its own, add_special_tokens only
    for the first (BOS), each with SentencePiece's dummy prefix."""
    from vlm2om.runtime.tokenizer import SentencePieceTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(tiny_bundle / "tokenizer.model"))
    conv, _, _ = two_turns(manifest["prompt"])
    ours = conv.tokenize(SentencePieceTokenizer(tiny_bundle / "tokenizer.model", 1, 2))
    before, after = SECOND.split("<ImageHere>")
    assert ours == [[sp.bos_id(), *sp.encode(before)], sp.encode(after)]
    assert sp.bos_id() == manifest["tokenizer"]["bos_id"] == 1


def test_generation_defaults_and_stopping(manifest):
    """Chat.answer's sampling settings; demo.py stops on "###"; the answer is
    ``output.split('###')[0].split('Assistant:')[-1].strip()``."""
    assert manifest["generation"] == {"max_new_tokens": 300, "do_sample": True, "temperature": 1.0,
                                      "top_p": 0.9, "repetition_penalty": 1.05}
    spec = manifest["prompt"]
    assert spec["stop_strings"] == ["###"]
    for raw in (" A cat on a mat.###Human: more", "Assistant: A cat on a mat.", "A cat on a mat.  "):
        assert clean_answer(raw, spec) == raw.split("###")[0].split("Assistant:")[-1].strip()


def blip2_eval(image: Image.Image) -> np.ndarray:
    """Blip2ImageEvalProcessor without torchvision: its Resize on a PIL image is PIL's resize;
    ToTensor is HWC uint8 -> CHW / 255; then (x - mean) / std per channel."""
    x = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC), np.float32) / 255.0
    return ((x - MEAN) / STD).transpose(2, 0, 1)[None]


@pytest.mark.parametrize("w,h,mode", [(173, 61, "RGB"), (224, 224, "RGB"), (500, 337, "L"), (80, 333, "RGBA")])
def test_preprocessing_is_blip2_image_eval_processor(manifest, w, h, mode):
    img = synthetic_image(w, h, seed=w, mode=mode)
    ours = preprocess(img, manifest["preprocess"]["steps"])
    assert ours.shape == (1, 3, SIZE, SIZE) and ours.dtype == np.float32  # aspect not kept, no crop
    np.testing.assert_allclose(ours, blip2_eval(img), rtol=0, atol=1e-6)


def test_sample_image_through_the_pipeline(tiny_bundle, sample_image):
    """What the runtime feeds the vision graph for a file on disk."""
    from vlm2om.runtime.bundle import Bundle

    steps = Bundle.open(tiny_bundle).manifest["preprocess"]["steps"]
    np.testing.assert_allclose(preprocess(sample_image, steps), blip2_eval(Image.open(sample_image)),
                               rtol=0, atol=1e-6)
