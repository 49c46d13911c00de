"""LLaVA-1.5's prompt and preprocessing written out here from the original code (FastChat's
conv_vicuna_v1 / LLaVA's conv_llava_v1 in SEP_STYLE.TWO, ``"<image>\\n" + question`` for the first
turn, expand2square then CLIPImageProcessor), NOT from the recipe's constants."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.helpers.images import synthetic_image
from vlm2om.runtime.preprocess import preprocess
from vlm2om.runtime.prompts import Conversation

SYSTEMS = {
    "vicuna_v1": "A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "llava_v1": "A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.",
}
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
FILL = (122, 116, 104)  # expand2square's background: tuple(int(x * 255) for x in image_mean)


def _spec(template: str, llava_bundle) -> dict:
    if template == "vicuna_v1":  # the default, as the v1.5 evaluation scripts use it
        return json.loads((llava_bundle / "manifest.json").read_text())["prompt"]
    from vlm2om.exporters.families import get_family

    family = get_family("llava15")
    return family.plan(family.ExportOptions(preset="tiny", template=template)).manifest["prompt"]


@pytest.mark.parametrize("template", list(SYSTEMS))
def test_two_style_prompt_text(template, llava_bundle):
    system = SYSTEMS[template]
    conv = Conversation(_spec(template, llava_bundle))
    conv.add_image()
    conv.ask("What is this?")
    assert conv.render() == f"{system} USER: <image>\nWhat is this? ASSISTANT:"
    conv.answer("A cat.")
    conv.ask("Its colour?")
    assert conv.render() == f"{system} USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: Its colour? ASSISTANT:"
    assert conv.segments() == [f"{system} USER: ", "\nWhat is this? ASSISTANT: A cat.</s>USER: Its colour? ASSISTANT:"]


def llava_eval(image: Image.Image, size: int) -> np.ndarray:
    """image_aspect_ratio='pad': expand2square (centred, floored) on RGB, then CLIPImageProcessor,
    which on a square image is a bicubic resize to size x size (the crop keeps it), / 255, normalize."""
    img = image.convert("RGB")
    w, h = img.size
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), FILL)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    x = np.asarray(canvas.resize((size, size), Image.BICUBIC), np.float32) / 255.0
    return ((x - MEAN) / STD).transpose(2, 0, 1)[None]


@pytest.mark.parametrize("w,h,mode", [(173, 61, "RGB"), (61, 173, "RGB"), (97, 97, "L"), (80, 333, "RGBA")])
def test_preprocessing_pads_to_square_then_clip(llava_bundle, w, h, mode):
    steps = json.loads((llava_bundle / "manifest.json").read_text())["preprocess"]["steps"]
    img = synthetic_image(w, h, seed=h, mode=mode)
    ours = preprocess(img, steps)
    assert ours.shape == (1, 3, 56, 56)  # the tiny preset's tower; the real one is 336
    np.testing.assert_allclose(ours, llava_eval(img, 56), rtol=0, atol=1e-5)


def test_real_size_preprocessing():
    from vlm2om.exporters.families.llava15.recipe import preprocess_steps

    img = synthetic_image(500, 337, seed=3)
    np.testing.assert_allclose(preprocess(img, preprocess_steps(336)), llava_eval(img, 336), rtol=0, atol=1e-5)
