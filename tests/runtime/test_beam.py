"""Beam search (``num_beams``) against transformers' own ``generate(num_beams=..., do_sample=False)``.

The oracle is a tiny HF ``LlavaForConditionalGeneration`` saved with ``save_pretrained`` and
exported with ``--checkpoint`` and batch gears 1, 2, 4. HF is fed the prompt as embeddings it
computes itself (its token embedding with its image features scattered in), the way the runtime
feeds the bundle, so the repetition penalty sees the generated tokens only on both sides. Each
case compares the answer token for token, the best hypothesis' score, and the number of decoder
steps (so the search stops exactly when transformers' does). EOS ids are taken from the plain
beam answer, so hypotheses finish before the length limit and the early-stop rules decide.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from tests.helpers import SAMPLE_IMAGE
from tests.helpers.llava_tiny import IMAGE_TOKEN, IMAGE_TOKENS, export_hf_llava
from vlm2om.runtime import GenerationConfig, open_bundle
from vlm2om.runtime.beam import beam_gear, beam_search, reorder_rows
from vlm2om.runtime.errors import BundleError, InputError
from vlm2om.runtime.kv_cache import KVCache
from vlm2om.runtime.preprocess import preprocess
from vlm2om.runtime.prompts import Conversation, tokenize_prompt

QUESTION = "What is in the picture?"
NEW = 24


@dataclass
class Oracle:
    model: object
    pipe: object
    root: object
    ids: list[int]
    pixels: torch.Tensor
    embeds: torch.Tensor
    calls: list[int]  # HF forward calls, counted by a hook
    answer: list[int]  # HF's plain beam answer (3 beams, NEW tokens, no EOS): where EOS ids come from


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    root = tmp_path_factory.mktemp("beam-oracle")
    model, bundle = export_hf_llava(root, cache_gears=(160, 256), batch_gears=(1, 2, 4))
    pipe = open_bundle(bundle)
    assert pipe.decoder.batch_gears == [1, 2, 4]
    conv = Conversation(pipe.prompt)
    conv.add_image()
    conv.ask(QUESTION)
    seg0, seg1 = tokenize_prompt(pipe.tokenizer, conv.segments(), pipe.prompt)
    ids = seg0 + [IMAGE_TOKEN] * IMAGE_TOKENS + seg1
    pixels = torch.from_numpy(preprocess(SAMPLE_IMAGE, pipe.bundle.manifest["preprocess"]["steps"]))
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                         vision_feature_select_strategy="default").pooler_output
        embeds = model.get_input_embeddings()(torch.tensor([ids]))
        embeds = embeds.masked_scatter((torch.tensor([ids]) == IMAGE_TOKEN)[..., None],
                                       torch.cat(list(feats)).reshape(-1, embeds.shape[-1]))
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    o = Oracle(model, pipe, root / "bundle", ids, pixels, embeds, calls, [])
    o.answer = hf_beam(o, 3, NEW)[0]
    return o


def hf_beam(o: Oracle, num_beams: int, new: int, eos: int | list[int] | None = None, **kw):
    """(answer without its EOS, whether it ended on EOS, best score, HF forward calls)."""
    o.calls[0] = 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the penalty-with-inputs_embeds notice, which is the point
        out = o.model.generate(inputs_embeds=o.embeds, max_new_tokens=new, num_beams=num_beams, do_sample=False,
                               eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True,
                               output_scores=num_beams > 1, **kw)
    tokens = out.sequences[0].tolist()
    ended = eos is not None and tokens[-1] in (eos if isinstance(eos, list) else [eos])
    score = float(out.sequences_scores[0]) if num_beams > 1 else None
    return (tokens[:-1] if ended else tokens), ended, score, o.calls[0]


def ours(o: Oracle, monkeypatch, cfg: GenerationConfig, eos: tuple[int, ...], stops: tuple[str, ...] = ()):
    """(the runtime's best hypothesis, decoder steps it ran)."""
    steps, step = [0], o.pipe.decoder.step

    def counting(*args, **kw):
        steps[0] += 1
        return step(*args, **kw)

    monkeypatch.setattr(o.pipe.decoder, "step", counting)
    chat = o.pipe.chat(SAMPLE_IMAGE)
    _, _, logits = chat._prefill(QUESTION)
    best = beam_search(o.pipe.decoder, chat.cache, logits[0], cfg, eos, stops, o.pipe.tokenizer)
    assert chat.cache.length == len(o.ids) and chat.cache.batch == 1  # the chat's own cache is left as it was
    return best, steps[0]


# name, num_beams, EOS ids (indices into the plain answer; None: no EOS), options, new tokens, HF stops early
CASES = [
    ("plain", 3, None, {}, 32, False),  # 131 prompt + 31 steps: the beams' cache grows past gear 160
    ("one-token", 3, None, {}, 1, False),
    ("repetition-penalty", 3, None, {"repetition_penalty": 1.3}, NEW, False),
    ("repetition-penalty-eos", 3, (8,), {"repetition_penalty": 1.05}, NEW, False),
    ("heuristic-stop", 4, (1,), {}, NEW, True),  # beams still running when the heuristic ends the search
    ("early-stopping", 4, (1,), {"early_stopping": True}, NEW, True),
    ("two-beams", 2, (5,), {}, NEW, True),
    ("two-eos-ids", 3, (9, 6), {}, NEW, True),  # 3 * num_beams candidates, as transformers keeps
    ("length-penalty-short", 3, (11,), {"length_penalty": 0.3}, NEW, False),
    ("length-penalty-long", 3, (0,), {"length_penalty": 2.0, "early_stopping": True}, NEW, True),
    ("min-new-tokens", 3, (0,), {"min_new_tokens": 5}, NEW, True),
]


@pytest.mark.parametrize("name, beams, eos_at, options, new, early", CASES, ids=[c[0] for c in CASES])
def test_beam_search_matches_transformers(oracle, monkeypatch, name, beams, eos_at, options, new, early):
    eos = None if eos_at is None else [oracle.answer[i] for i in eos_at]
    expected, ended, score, calls = hf_beam(oracle, beams, new, eos, **options)
    cfg = GenerationConfig(max_new_tokens=new, num_beams=beams, stop_on_eos=eos is not None, stop_strings=(),
                           **options)
    best, steps = ours(oracle, monkeypatch, cfg, (2,) if eos is None else tuple(eos))
    assert best.tokens == expected
    assert best.finish_reason == ("eos" if ended else "length")
    assert abs(best.score - score) < 1e-4, (best.score, score)
    assert steps == calls - 1  # HF's first forward is the prefill
    assert (calls < new) is early  # the case exercises the stopping rule it names
    if name == "plain":
        greedy = hf_beam(oracle, 1, new)[0]
        assert best.tokens != greedy
        from_ids = oracle.model.generate(input_ids=torch.tensor([oracle.ids]), pixel_values=oracle.pixels,
                                         max_new_tokens=new, num_beams=beams, do_sample=False, eos_token_id=None,
                                         pad_token_id=0)[0, len(oracle.ids):].tolist()
        assert from_ids == expected  # HF's own llava path (ids + pixels) agrees with its embeddings
    if "repetition_penalty" in options or "min_new_tokens" in options:  # the option changes the answer
        plain = {k: v for k, v in options.items() if k not in ("repetition_penalty", "min_new_tokens")}
        assert hf_beam(oracle, beams, new, eos, **plain)[0] != expected
    if name == "early-stopping":
        assert calls < hf_beam(oracle, beams, new, eos)[3]  # stops before early_stopping=False would


def test_a_stop_string_ends_a_hypothesis_as_eos_would(oracle, monkeypatch):
    """A stop string that only one token's text completes ends a hypothesis where that token as EOS
    would; the token stays in the answer (as in greedy decoding), the text stops before it."""
    token = oracle.answer[4]
    stop = oracle.pipe.tokenizer.decode([token]).strip()
    assert len(stop) >= 3
    expected, ended, score, calls = hf_beam(oracle, 3, NEW, token)
    assert ended
    cfg = GenerationConfig(max_new_tokens=NEW, num_beams=3, stop_on_eos=False, stop_strings=(stop,))
    best, steps = ours(oracle, monkeypatch, cfg, (2,), (stop,))
    assert (best.tokens, best.finish_reason) == (expected + [token], "stop")
    assert abs(best.score - score) < 1e-4 and steps == calls - 1
    chat = oracle.pipe.chat(SAMPLE_IMAGE)
    text = "".join(chat.ask(QUESTION, cfg))
    assert (chat.last.tokens, chat.last.finish_reason) == (best.tokens, "stop")
    assert stop not in text and chat.last.text == chat.conv.clean(text)


def test_chat_turn_with_beams_and_the_turn_after(oracle, monkeypatch):
    """A beam turn fills the result and leaves the cache holding the prompt: the next turn reuses it
    and answers as a chat that prefills the whole conversation afresh."""
    monkeypatch.setattr(oracle.pipe, "eos_ids", (oracle.answer[9],))
    expected, ended, _, _ = hf_beam(oracle, 3, NEW, oracle.answer[9])
    assert ended and len(expected) < NEW
    chat = oracle.pipe.chat(SAMPLE_IMAGE)
    pieces = list(chat.ask(QUESTION, GenerationConfig(max_new_tokens=NEW, num_beams=3, stop_strings=())))
    r = chat.last
    assert (r.tokens, r.finish_reason, r.prompt_tokens) == (expected, "eos", len(oracle.ids))
    assert len(pieces) <= 1 and r.text == chat.conv.clean(oracle.pipe.tokenizer.decode(expected))
    assert chat.cached_keys == r.layout.keys and chat.cache.length == len(oracle.ids) and chat.cache.batch == 1
    assert chat.conv.messages[-1][1] == r.text

    follow = GenerationConfig(max_new_tokens=8, stop_on_eos=False, stop_strings=())
    list(chat.ask("And the colours?", follow))
    assert chat.last.reused_tokens == len(oracle.ids)
    fresh = oracle.pipe.chat(SAMPLE_IMAGE)
    fresh.conv.messages = [list(m) for m in chat.conv.messages[:-2]]
    list(fresh.ask("And the colours?", follow))
    assert fresh.last.reused_tokens == 0 and fresh.last.tokens == chat.last.tokens


def test_no_batch_gear_holds_the_beams(oracle):
    chat = oracle.pipe.chat(SAMPLE_IMAGE)
    before = [list(m) for m in chat.conv.messages]
    with pytest.raises(InputError, match="num_beams=5 needs a batch gear of at least 5 rows, but the bundle's "
                                         "largest batch gear is 4"):
        list(chat.ask(QUESTION, GenerationConfig(num_beams=5)))
    assert chat.conv.messages == before and chat.cache.length == 0  # refused before any prefill
    with pytest.raises(InputError, match="largest batch gear is 1"):
        beam_gear([1], 2)
    assert (beam_gear([1, 2, 4], 2), beam_gear([1, 2, 4], 3), beam_gear([1, 2, 4], 4)) == (2, 4, 4)


@pytest.mark.parametrize("kind", ["stacked", "per_layer"])
def test_rows_reorder_in_place_with_repeats(kind):
    rng = np.random.default_rng(0)
    cache = KVCache([1, 2], 2, 4, "float32", [8, 16], batch=4, kind=kind)
    n = 6
    cache.reserve(n)
    for a in cache.arrays.values():
        a[..., :n, :] = rng.normal(size=a[..., :n, :].shape)
    cache.mask[:, :n] = rng.integers(0, 2, (4, n))
    cache.length, cache.prefix[:] = n, [3, 4, 5, 6]
    before = {k: a.copy() for k, a in cache.arrays.items()}
    mask, views = cache.mask.copy(), dict(cache.arrays)
    origins = [1, 0, 0, 2]  # a swap, a repeat, and a row read after it is overwritten
    reorder_rows(cache, origins)
    for k, a in cache.arrays.items():
        assert a is views[k]  # in place
        np.testing.assert_array_equal(a, np.take(before[k], origins, axis=KVCache._batch_axis(k)))
    np.testing.assert_array_equal(cache.mask, mask[origins])
    assert cache.prefix.tolist() == [4, 3, 3, 5]
    grown = cache.select_rows([2, 2, 2], 4)  # select_rows copies repeated rows as well
    for k, a in grown.arrays.items():
        axis = KVCache._batch_axis(k)
        for r in range(3):
            np.testing.assert_array_equal(np.take(a, r, axis), np.take(cache.arrays[k], 2, axis))
        assert not np.take(a, 3, axis).any()


@pytest.mark.parametrize("change, message", [
    ({"num_beams": 0}, "num_beams must be an integer >= 1"), ({"num_beams": 2.0}, "num_beams must be an integer"),
    ({"num_beams": True}, "num_beams must be an integer"),
    ({"num_beams": 3, "do_sample": True}, "only greedy beam search is"),
    ({"length_penalty": float("nan")}, "length_penalty must be a finite number"),
    ({"length_penalty": "1"}, "length_penalty must be a finite number"),
    ({"early_stopping": "never"}, "early_stopping must be True or False")])
def test_beam_options_are_validated(change, message):
    with pytest.raises(InputError, match=message):
        GenerationConfig(**change)
    GenerationConfig(num_beams=3, length_penalty=-0.5, early_stopping=True)  # any finite penalty, as HF
    assert GenerationConfig.from_manifest({"num_beams": 3}).num_beams == 3
    with pytest.raises(BundleError, match="generation entry cannot be used"):
        GenerationConfig.from_manifest({"num_beams": 3, "do_sample": True})


def test_num_beams_option(oracle):
    import click
    from click.testing import CliRunner

    from vlm2om.exporters.cli.main import main
    from vlm2om.exporters.cli.serve import generation_config

    greedy, samples = GenerationConfig(), GenerationConfig(do_sample=True, top_p=0.9)
    assert generation_config(greedy, num_beams=3).num_beams == 3
    assert generation_config(samples, greedy=True, num_beams=3).num_beams == 3
    assert generation_config(GenerationConfig(num_beams=3), sample=True).num_beams == 1  # sampling asked for
    for defaults, options, why in ((samples, {}, "this bundle samples by default"),
                                   (greedy, {"sample": True}, "--sample asks for sampling"),
                                   (greedy, {"temperature": 0.7}, "--temperature 0.7 turns sampling on")):
        with pytest.raises(click.UsageError, match=f"greedy beam search .*{why}: add --greedy"):
            generation_config(defaults, num_beams=2, **options)

    r = CliRunner().invoke(main, ["run", str(oracle.root), "--image", str(SAMPLE_IMAGE), "--prompt", QUESTION,
                                  "--max-new-tokens", "8", "--num-beams", "3", "--stats"])
    assert r.exit_code == 0, r.output
    chat = oracle.pipe.chat(SAMPLE_IMAGE)
    list(chat.ask(QUESTION, oracle.pipe.defaults.but(max_new_tokens=8, num_beams=3)))
    assert chat.last.text and r.stdout.strip() == chat.last.text
    assert f"{len(chat.last.tokens)} tokens" in r.stderr
    for beams, code, message in (("0", 2, "--num-beams"), ("8", 1, "largest batch gear is 4")):
        r = CliRunner().invoke(main, ["run", str(oracle.root), "--image", str(SAMPLE_IMAGE), "--prompt", QUESTION,
                                      "--num-beams", beams])
        assert r.exit_code == code and message in r.output, r.output
