"""InternLM-XComposer2 VL and 4KHD end to end against the original's computation rebuilt on the
original state dict (tests/helpers/ixc2_original.py: transformers' CLIPVisionModel and
LlamaForCausalLM with PLoRA hooks, HD_transform and build_mlp's layout, interleav_wrap_chat).

A tiny checkpoint folder in the published layout is exported with ``vlm2om export ixc2-vl|ixc2-4khd
--checkpoint`` (so the loader's tables are part of the check), then run on onnxruntime: the image
rows, and greedy tokens for 32 steps on two turns (the second reusing the cached prefix), equal
the original's. 4KHD runs an image that needs several crops and, with a run-time ``hd_num`` of 1,
one that needs one. The README's ``num_beams=3`` decoding on the bundle's batch gear equals
transformers' own beam search over the same computation. The bundle has no meta instruction (``--meta-instruction ''``), so the image is
half of the prompt and moves the logits well beyond the tolerance; test_prompt_literal.py checks
the default one."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.helpers.images import synthetic_image
from tests.helpers.ixc2_checkpoints import write_ixc2_checkpoint
from tests.helpers.ixc2_original import OriginalIxc2
from vlm2om.exporters.cli.main import main
from vlm2om.runtime import GenerationConfig, open_bundle

STEPS = 32
GREEDY = GenerationConfig(max_new_tokens=STEPS, do_sample=False, stop_on_eos=False, stop_strings=())
LOGITS_ATOL = 2e-5
BEAM_STEPS = 32
QUESTIONS = ("Describe this image in detail.", "What colour is the top left corner?")


def _strong_image_side(state: dict) -> dict:
    """vision_proj at a scale where the image moves the logits (random weights at 0.02 barely do)."""
    for k in list(state):
        if k.startswith("vision_proj.") and k.endswith("weight"):
            state[k] = state[k] * 12
    return state


@pytest.fixture(scope="module", params=["vl", "4khd"])
def exported(request, tmp_path_factory):
    variant = request.param
    root = tmp_path_factory.mktemp(f"ixc2-{variant}")
    state = write_ixc2_checkpoint(root / "ckpt", variant, seed=4, edit=_strong_image_side)
    bundle = root / "bundle"
    args = ["export", f"ixc2-{variant}", "--checkpoint", str(root / "ckpt"), "--out", str(bundle),
            "--dtype", "float32", "--meta-instruction", "", "--seq-gears", "1,32,128", "--cache-gears", "512,1024", "--layers-per-group", "1",
            "--batch-gears", "1,4"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    return variant, state, bundle


def _two_turns(exported, image, hd_num: int | None = None):
    variant, state, bundle = exported
    tokenizer = (bundle / "tokenizer.model").read_bytes()
    original = OriginalIxc2(state, variant, tokenizer, hd_num=hd_num or 25)
    pipe = open_bundle(bundle, hd_num=hd_num) if hd_num else open_bundle(bundle)
    chat = pipe.chat(image)
    rows = original.image(image)
    np.testing.assert_allclose(chat.images[0], rows.numpy(), rtol=1e-4, atol=1e-4)
    history, logits = [], []
    for i, question in enumerate(QUESTIONS):
        "".join(chat.ask(question, GREEDY, record_logits=True))
        query = "<ImageHere>" + question if i == 0 else question
        want, want_logits = original.greedy(rows, original.prompt(history, query, meta=""), STEPS)
        first = next((k for k, (a, b) in enumerate(zip(chat.last.tokens, want)) if a != b), None)
        assert chat.last.tokens == want, f"{variant} turn {i}: first mismatch at step {first}"
        np.testing.assert_allclose(np.stack(chat.last.logits), np.stack(want_logits), rtol=0, atol=LOGITS_ATOL)
        history.append((query, chat.last.text))
        logits.append(np.stack(chat.last.logits))
    assert chat.last.reused_tokens > len(rows)  # the second turn reused the image's cache rows
    return len(rows), logits


def test_two_greedy_turns_equal_the_original(exported):
    variant = exported[0]
    image = synthetic_image(90, 60, seed=3)
    rows, logits = _two_turns(exported, image)
    if variant == "4khd":
        t = 2  # the tiny 56 px view merges to 2 x 2 tokens
        h, w = 4, 6  # HD_transform of 90 x 60 at hd_num 25: 6 x 4 crops of 56 px
        assert rows == (h * w + 1) * t * t + 1 + (h + 1) * t
    # The image moves the logits far beyond the tolerance (else the checks would not see the image side).
    _, other = _two_turns(exported, synthetic_image(60, 90, seed=8))
    assert np.abs(other[0][0] - logits[0][0]).max() > 100 * LOGITS_ATOL


@pytest.mark.parametrize("exported", ["4khd"], indirect=True)
def test_4khd_single_crop_with_run_time_hd_num(exported):
    rows, _ = _two_turns(exported, synthetic_image(64, 64, seed=5), hd_num=1)
    assert rows == (1 + 1) * 4 + 1 + 2 * 2


def test_plora_matters_on_image_rows(exported):
    """Switching PLoRA off in the original moves its logits far beyond the tolerance, so the checks
    above see im_mask."""
    variant, state, bundle = exported
    tokenizer = (bundle / "tokenizer.model").read_bytes()
    image = synthetic_image(90, 60, seed=3)
    off = {k: (torch.zeros_like(v) if "Plora_B" in k else v) for k, v in state.items()}
    on, without = OriginalIxc2(state, variant, tokenizer), OriginalIxc2(off, variant, tokenizer)
    prompt = on.prompt([], "<ImageHere>" + QUESTIONS[0], meta="")
    _, a = on.greedy(on.image(image), prompt, 1)
    _, b = without.greedy(on.image(image), prompt, 1)
    assert np.abs(a[0] - b[0]).max() > 100 * LOGITS_ATOL


def test_beam_search_as_the_readme_decodes_equals_transformers(exported):
    """``chat(..., do_sample=False, num_beams=3)`` with chat's repetition penalty 1.005: the bundle's
    beams on its batch gear against transformers' own beam search over the original's computation."""
    variant, state, bundle = exported
    tokenizer = (bundle / "tokenizer.model").read_bytes()
    original = OriginalIxc2(state, variant, tokenizer)
    image = synthetic_image(90, 60, seed=3)
    pipe = open_bundle(bundle)
    chat = pipe.chat(image)
    cfg = GenerationConfig(max_new_tokens=BEAM_STEPS, do_sample=False, num_beams=3, repetition_penalty=1.005,
                           stop_strings=())
    "".join(chat.ask(QUESTIONS[0], cfg))
    prompt = original.prompt([], "<ImageHere>" + QUESTIONS[0], meta="")
    want = original.beams(original.image(image), prompt, BEAM_STEPS, list(pipe.eos_ids), num_beams=3,
                          repetition_penalty=1.005)
    assert chat.last.tokens == [t for t in want if t not in pipe.eos_ids]
    if variant == "4khd":  # there the beams choose another answer than greedy decoding (VL's tiny model
        greedy, _ = original.greedy(original.image(image), prompt, BEAM_STEPS)  # repeats one token either way)
        assert want != greedy
