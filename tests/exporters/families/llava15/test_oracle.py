"""LLaVA-1.5 end to end against transformers' ``LlavaForConditionalGeneration``, an implementation
nobody here wrote: a tiny HF model is saved with its own ``save_pretrained`` (a llava-hf folder),
exported with ``--checkpoint`` (so loading is part of the check) and run on onnxruntime.

What is compared, and where transformers' own pipeline differs from LLaVA's evaluation:
- pixels: our preprocessing equals ``CLIPImageProcessor`` applied after LLaVA's ``expand2square``;
  llava-hf's processor alone does not pad to square, so on a non-square image it differs;
- tokens: we tokenize as LLaVA's ``tokenizer_image_token`` (each chunk on its own); llava-hf's
  processor tokenizes the whole prompt with ``<image>`` as a special token, which loses the
  SentencePiece dummy-prefix piece in front of the text that follows the image (LLaVA's ids
  have 29871 there at real size). HF is fed LLaVA's ids with the image token repeated;
- logits at every position of prompt and answer, and the greedy tokens.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T
from PIL import Image

from tests.helpers.images import llava_expand2square
from tests.helpers.llava_tiny import IMAGE_TOKEN, IMAGE_TOKENS, VISION, export_hf_llava

from vlm2om.exporters.families.llava15 import recipe as llava
from vlm2om.runtime import GenerationConfig, open_bundle
from vlm2om.runtime.preprocess import preprocess
from vlm2om.runtime.prompts import Conversation, tokenize_prompt

QUESTION = "What is in the picture?"
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """(HF model, the bundle exported from its llava-hf folder)."""
    root = tmp_path_factory.mktemp("llava-oracle")
    model, bundle = export_hf_llava(root, cache_gears=(128, 256))
    return model, open_bundle(bundle)


def _prompt_ids(pipe) -> list[list[int]]:
    conv = Conversation(pipe.prompt)
    conv.add_image()
    conv.ask(QUESTION)
    return tokenize_prompt(pipe.tokenizer, conv.segments(), pipe.prompt)


def test_preprocessing_matches_clip_image_processor_after_expand2square(oracle, sample_image):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    _, pipe = oracle
    size = VISION["image_size"]
    proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size=size, image_mean=llava.CLIP_MEAN,
                                 image_std=llava.CLIP_STD)
    img = Image.open(sample_image).convert("RGB")
    assert img.size[0] != img.size[1]
    ours = preprocess(img, pipe.bundle.manifest["preprocess"]["steps"])
    padded = proc(llava_expand2square(img, (122, 116, 104)), return_tensors="np")["pixel_values"]
    assert np.abs(ours - padded).max() < 1e-5
    unpadded = proc(img, return_tensors="np")["pixel_values"]  # llava-hf's processor as is
    assert np.abs(ours - unpadded).max() > 0.1


def test_llava_hf_processor_ids_differ_only_by_the_dummy_prefix(oracle, tmp_path, sample_image):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    _, pipe = oracle
    (tmp_path / "tokenizer.model").write_bytes(pipe.bundle.path("tokenizer.model").read_bytes())
    tok = T.LlamaTokenizer.from_pretrained(str(tmp_path), legacy=False, add_bos_token=True)
    tok.add_tokens([T.AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_TOKEN
    proc = T.LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size=56),
                            tokenizer=tok, patch_size=VISION["patch_size"], image_token="<image>",
                            vision_feature_select_strategy="default", num_additional_image_tokens=1)
    conv = Conversation(pipe.prompt)
    conv.add_image()
    conv.ask(QUESTION)
    hf_ids = proc(images=Image.open(sample_image), text=conv.render(), return_tensors="pt")["input_ids"][0].tolist()
    seg0, seg1 = _prompt_ids(pipe)
    dummy = pipe.tokenizer.sp.PieceToId("\u2581")
    assert seg1[0] == dummy  # "\n..." after the image starts with the lone dummy-prefix piece
    assert hf_ids == seg0 + [IMAGE_TOKEN] * IMAGE_TOKENS + seg1[1:]


@torch.no_grad()
def test_logits_and_greedy_tokens_match_transformers(oracle, sample_image):
    model, pipe = oracle
    seg0, seg1 = _prompt_ids(pipe)
    ids = seg0 + [IMAGE_TOKEN] * IMAGE_TOKENS + seg1
    pixels = torch.from_numpy(preprocess(sample_image, pipe.bundle.manifest["preprocess"]["steps"]))

    expected = model.generate(input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=NEW_TOKENS,
                              do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    chat = pipe.chat(sample_image)
    list(chat.ask(QUESTION, GenerationConfig(max_new_tokens=NEW_TOKENS, stop_on_eos=False)))
    assert chat.last.prompt_tokens == len(ids)
    assert chat.last.tokens == expected
    assert max(expected) >= pipe.tokenizer.vocab_size  # logits wider than the tokenizer, as llava-hf's

    # Logits at every prompt-end and answer position: HF on the whole sequence at once; the bundle
    # prefilling in gear chunks, then decoding token by token through its KV cache.
    full = model(input_ids=torch.tensor([ids + expected]), pixel_values=pixels).logits[0, len(ids) - 1:-1].numpy()
    _, ours = pipe.chat(sample_image).score(QUESTION, expected)  # teacher-forced through the KV cache
    diff = float(np.abs(np.stack(ours) - full).max())
    print(f"llava oracle: max |logits diff| {diff:.3e} over {len(ours)} positions")
    assert diff < 1e-4, diff
    top2 = np.sort(full, axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 10 * diff  # no near-tie decided the tokens
