"""Batched generation: batch-N tokens equal batch-1 tokens, rows leave the batch as they stop."""
from __future__ import annotations

import pytest
from PIL import ImageOps

from vlm2om.runtime import GenerationConfig, InputError, open_bundle
from vlm2om.runtime.batch import BatchGenerator, generate_batch
from vlm2om.runtime.kv_cache import KVCache

GREEDY = GenerationConfig(max_new_tokens=12, do_sample=False, stop_on_eos=False, stop_strings=())
QUESTIONS = ["Describe this image in detail.", "What is it?", "Tell me about the colours, the shapes and the light."]


def _images(sample_image):
    from PIL import Image

    img = Image.open(sample_image)
    return [img, ImageOps.mirror(img), ImageOps.flip(img)]


def test_batch_tokens_equal_batch_one(tiny_batch_bundle, sample_image, monkeypatch):
    pipe = open_bundle(tiny_batch_bundle)
    images = _images(sample_image)
    singles = []
    for image, q in zip(images, QUESTIONS):
        chat = pipe.chat(image)
        list(chat.ask(q, GREEDY))
        singles.append(chat.last)
    assert len({s.prompt_tokens for s in singles}) == 3  # prompts of different lengths share the prefill

    moves = []
    real = KVCache.select_rows
    monkeypatch.setattr(KVCache, "select_rows", lambda self, rows, b: moves.append((len(rows), b)) or real(self, rows, b))
    # Three sequences run on the batch-4 gear; each stops on its own after 3, 12 and 7 tokens.
    cfgs = [GREEDY.but(max_new_tokens=n) for n in (3, 12, 7)]
    res = generate_batch(pipe, images, QUESTIONS, cfgs)
    assert res.batch_gear == 4
    for seq, single, cfg in zip(res.sequences, singles, cfgs):
        assert seq.tokens == single.tokens[:cfg.max_new_tokens]
        assert seq.finish_reason == "length" and seq.prompt_tokens == single.prompt_tokens
    assert moves == [(2, 2), (1, 1)]  # 4 -> 2 rows after the first stops, -> 1 after the second

    full = generate_batch(pipe, images[:2], QUESTIONS[:2], GREEDY)
    assert full.batch_gear == 2
    assert [s.tokens for s in full.sequences] == [s.tokens for s in singles[:2]]
    assert [s.text for s in full.sequences] == [s.text for s in singles[:2]]


def test_stop_string_ends_one_sequence(tiny_batch_bundle, sample_image):
    pipe = open_bundle(tiny_batch_bundle)
    images = _images(sample_image)[:2]
    chat = pipe.chat(images[0])
    list(chat.ask(QUESTIONS[0], GREEDY))
    text = pipe.tokenizer.decode(chat.last.tokens)
    stop = next(text[i:i + 2] for i in range(len(text) // 2, len(text) - 1) if not text[i:i + 2].isspace())
    cfg = GREEDY.but(stop_strings=(stop,))
    res = generate_batch(pipe, images, QUESTIONS[:2], cfg)
    for image, q, seq in zip(images, QUESTIONS[:2], res.sequences):
        alone = pipe.chat(image)
        list(alone.ask(q, cfg))
        assert (seq.tokens, seq.text, seq.finish_reason) == (alone.last.tokens, alone.last.text,
                                                             alone.last.finish_reason)
    assert res.sequences[0].finish_reason == "stop" and len(res.sequences[0].tokens) < GREEDY.max_new_tokens


def test_bundle_without_batch_gears_runs_batch_one_only(tiny_bundle, sample_image):
    pipe = open_bundle(tiny_bundle)
    gen = BatchGenerator(pipe)
    assert gen.batches == [1]
    with pytest.raises(InputError, match="largest batch gear 1"):
        gen.gear_for(2)
    chat = pipe.chat(sample_image)
    list(chat.ask(QUESTIONS[1], GREEDY))
    res = gen.generate([gen.prompt(pipe.encode_image(sample_image), QUESTIONS[1])], GREEDY)
    assert res.sequences[0].tokens == chat.last.tokens


def test_a_batch_refuses_beam_search(tiny_batch_bundle, sample_image):
    """Beams are a chat turn's batch rows; a batch has its rows already."""
    pipe = open_bundle(tiny_batch_bundle)
    with pytest.raises(InputError, match="beam search answers one prompt at a time"):
        generate_batch(pipe, [sample_image, sample_image], QUESTIONS[:2], GREEDY.but(num_beams=2))
