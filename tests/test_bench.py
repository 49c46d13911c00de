"""`vlm2om bench` and batched generation: the seeds' CSV, and batch-N tokens equal batch-1 tokens."""
from __future__ import annotations

import csv

import pytest
from click.testing import CliRunner
from PIL import ImageOps

from vlm2om.exporters.cli.main import main
from vlm2om.runtime import GenerationConfig, InputError, open_bundle
from vlm2om.runtime.batch import BatchGenerator, generate_batch
from vlm2om.runtime.bench import SEED_COLUMNS
from vlm2om.runtime.kv_cache import KVCache

GREEDY = GenerationConfig(max_new_tokens=12, do_sample=False, stop_on_eos=False, stop_strings=())
QUESTIONS = ["Describe this image in detail.", "What is it?", "Tell me about the colours, the shapes and the light."]


def _images(sample_image):
    from PIL import Image

    img = Image.open(sample_image)
    return [img, ImageOps.mirror(img), ImageOps.flip(img)]


def test_bench_writes_the_seeds_csv(tiny_batch_bundle, tmp_path):
    r = CliRunner().invoke(main, ["bench", str(tiny_batch_bundle), "--batch", "1,2,8", "--input-lengths", "40,125",
                                  "--output-lengths", "6", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "input 40 < the shortest prompt" in r.output and "batch 8 > the largest batch gear 4" in r.output
    for batch in (1, 2):
        with open(tmp_path / f"{batch}_batch_performance_minigpt4.csv") as f:
            header, *rows = list(csv.reader(f))
        assert header[:len(SEED_COLUMNS)] == SEED_COLUMNS  # Batch, TokensPerSecond, ResponseTime(ms), ...
        assert "ImageTime(ms)" in header and "PeakMemory(MB)" in header
        (row,) = [dict(zip(header, map(float, x))) for x in rows]
        assert row["Batch"] == batch and row["InputLength"] == 125 and row["OutputLength"] == 6
        assert row["ResponseTime(ms)"] == pytest.approx(row["FirstTokenTime(ms)"] + 5 * row["TimePerTokens(ms)"])
        assert row["TokensPerSecond"] == pytest.approx(6000 / row["ResponseTime(ms)"])
        assert row["ImageTime(ms)"] > 0 and row["PeakMemory(MB)"] > 10
    assert not (tmp_path / "8_batch_performance_minigpt4.csv").exists()


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


def test_batch_gears_respect_the_atc_limit(tiny_opts):
    from vlm2om.exporters.families.minigpt4 import recipe as minigpt4
    from vlm2om.exporters.core.extras import apply_batch_gears, check_batch_gears

    plan = minigpt4.plan(tiny_opts.__class__(preset="tiny", seq_gears=(1, 2, 4, 8, 16), cache_gears=(128, 256, 512)))
    with pytest.raises(InputError, match=r"graph 'decoder_0': 15 seq/cache gears x 8 batch gears = 120"):
        apply_batch_gears(plan, (1, 2, 3, 4, 5, 6, 7, 8))
    with pytest.raises(InputError, match="must include 1"):
        check_batch_gears((2, 4))
    apply_batch_gears(plan, (1, 2, 4))
    dec = next(sg for sg in plan.subgraphs if sg.name == "decoder_0")
    assert len(dec.gears) == 45 and {g["batch"] for g in dec.gears} == {1, 2, 4}
    assert {sg.name for sg in plan.subgraphs if len({g.get("batch", 1) for g in sg.gears}) > 1} == \
        {"embed", "decoder_0", "decoder_1"}  # image graphs stay at batch 1
