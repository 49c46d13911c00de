"""VisualGLM-6B's prompt, tokenizer entry, generation defaults and preprocessing in the tiny
bundle's manifest, written out here from the original code (SAT ``model/chat.py`` chat(),
tokenization_chatglm.py, ``BlipImageEvalProcessor(224)``) and NOT from the recipe's constants:
the runtime and the torch reference both read the recipe, so a typo there would pass the others."""
from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image

from tests.helpers.images import synthetic_image
from vlm2om.runtime import open_bundle
from vlm2om.runtime.preprocess import preprocess
from vlm2om.runtime.prompts import Conversation

SIZE = 224
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


@pytest.fixture(scope="module")
def manifest(visualglm_bundle):
    return json.loads((visualglm_bundle / "manifest.json").read_text())


def test_chat_prompt_with_history(manifest):
    """chat(): '<img>' + '</img>' then for each past turn '问：{q}\\n答：{r}\\n', then '问：{q}\\n答：'."""
    c = Conversation(manifest["prompt"])
    c.add_image()
    c.ask("这是什么？")
    c.answer("一只猫。")
    c.ask("它  在哪里？\n说说")
    assert c.render() == "<img></img>问：这是什么？\n答：一只猫。\n问：它  在哪里？\n说说\n答："
    assert c.segments() == ["<img>", "</img>问：这是什么？\n答：一只猫。\n问：它  在哪里？\n说说\n答："]


def test_ids_end_with_gmask_sop_and_the_tokenizer_rules(manifest, visualglm_bundle):
    """build_inputs_with_special_tokens appends [gMASK] <sop>; the text side is SentencePiece over
    '<n>' for newlines and '<|blank_k|>' for k spaces (written out by hand here)."""
    t = manifest["tokenizer"]
    assert (t["kind"], t["file"], t["id_offset"], t["max_blank"]) == ("chatglm_sentencepiece", "ice_text.model", 0, 80)
    sp = spm.SentencePieceProcessor(model_file=str(visualglm_bundle / "ice_text.model"))
    assert (t["bos_id"], t["eos_id"], t["eos_ids"]) == (sp.PieceToId("<sop>"), sp.PieceToId("<eop>"),
                                                        [sp.PieceToId("<eop>")])
    chat = open_bundle(visualglm_bundle).chat(synthetic_image(64, 64, seed=1))
    c = Conversation(manifest["prompt"])
    c.add_image()
    c.ask("看  这里\n好")
    before, after = c.tokenize(chat.pipe.tokenizer)
    assert before == sp.EncodeAsIds("<img>")
    assert after == sp.EncodeAsIds("</img>问：看<|blank_2|>这里<n>好<n>答：") + [sp.PieceToId("[gMASK]"),
                                                                            sp.PieceToId("<sop>")]


def test_generation_defaults(manifest):
    """SAT chat(): max_length 1024, top_p 0.7, top_k 30, temperature 0.95, repetition_penalty 1.2;
    stop on <eop>; ChatGLM's InvalidScoreLogitsProcessor puts 5e4 on id 5."""
    assert manifest["generation"] == {"max_new_tokens": 1024, "max_length": 1024, "do_sample": True,
                                      "temperature": 0.95, "top_p": 0.7, "top_k": 30, "repetition_penalty": 1.2,
                                      "invalid_score_token": 5}
    assert manifest["pipeline"]["attention"] == "prefix_lm" and manifest["pipeline"]["positions"] == {"kind": "glm_2d"}
    assert manifest["prompt"]["answer_split"] == "答："


def blip_eval(image: Image.Image) -> np.ndarray:
    """BlipImageEvalProcessor(224) without torchvision: PIL bicubic resize to 224x224, /255, CLIP norm."""
    x = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC), np.float32) / 255.0
    return ((x - MEAN) / STD).transpose(2, 0, 1)[None]


@pytest.mark.parametrize("w,h,mode", [(173, 61, "RGB"), (224, 224, "RGB"), (500, 337, "L"), (80, 333, "RGBA")])
def test_preprocessing_is_blip_image_eval_processor(manifest, w, h, mode):
    img = synthetic_image(w, h, seed=w, mode=mode)
    ours = preprocess(img, manifest["preprocess"]["steps"])
    assert ours.shape == (1, 3, SIZE, SIZE)
    np.testing.assert_allclose(ours, blip_eval(img), rtol=0, atol=1e-5)
