"""Sampling, stop strings and streamed detokenization against transformers' warpers and
SentencePiece's own decode."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vlm2om.runtime.errors import InputError
from vlm2om.runtime.generation import GenerationConfig, Sampler, StopText


def _hf_scores(logits, generated, cfg):
    """transformers' own processors and warpers, in generate()'s order."""
    from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    ids = torch.tensor([generated])
    s = torch.tensor(logits, dtype=torch.float64)[None]
    s = RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty)(ids, s)
    s = TemperatureLogitsWarper(cfg.temperature)(ids, s)
    if cfg.top_k:
        s = TopKLogitsWarper(cfg.top_k)(ids, s)
    s = TopPLogitsWarper(cfg.top_p)(ids, s)
    return torch.softmax(s, -1)[0].numpy()


@pytest.mark.parametrize("top_p,top_k,temp,pen", [(0.9, 0, 1.0, 1.05), (0.5, 20, 0.7, 1.3), (1.0, 5, 1.5, 1.0)])
def test_sampling_distribution_matches_transformers(top_p, top_k, temp, pen):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=64) * 3
    generated = [3, 7, 7, 11]
    cfg = GenerationConfig(do_sample=True, top_p=top_p, top_k=top_k, temperature=temp, repetition_penalty=pen)
    expected = _hf_scores(logits, generated, cfg)
    n = 20000
    counts = np.zeros(64)
    sampler = Sampler(cfg.but(seed=1), eos_ids=(2,))
    for _ in range(n):
        sampler.generated = list(generated)
        counts[sampler(logits)] += 1
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(expected > 0))
    assert np.abs(counts / n - expected).max() < 0.015


def test_greedy_repetition_penalty_and_min_tokens():
    logits = np.array([0.0, 1.0, 5.0, 4.0])
    s = Sampler(GenerationConfig(repetition_penalty=2.0, min_new_tokens=1), eos_ids=(2,))
    assert s(logits) == 3  # EOS (2) suppressed before min_new_tokens
    assert s(logits) == 2  # now 3 is penalised 4 -> 2 and EOS may come


def test_stop_text_holds_back_partial_stop():
    st = StopText(("###",))
    assert st.push("Hello #") == "Hello "
    assert st.push("#") == ""
    assert st.push(" world") == "## world"
    assert st.push(" ##") == " "
    assert st.push("# tail") == "" and st.stopped
    assert st.text == "Hello ## world "


def test_detokenizer_matches_sentencepiece(tiny_bundle):
    from vlm2om.runtime.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(tiny_bundle / "tokenizer.model", 1, 2)
    rng = np.random.default_rng(0)
    for ids in [tok.encode("Hello, 世界! A cat 😺 sits.", bos=False),
                list(rng.integers(3, tok.vocab_size, 60))]:
        stream = tok.stream()
        assert "".join(stream.push(int(i)) for i in ids) == tok.decode([int(i) for i in ids])


@pytest.mark.parametrize("change, message", [
    ({"temperature": float("nan")}, "temperature must be a finite"), ({"temperature": 1e-320}, "normal number"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty must be a finite"),
    ({"top_p": 5e-324}, "top_p must be a finite"), ({"seed": -1}, "seed must be >= 0")])
def test_generation_config_refuses_values_that_break_sampling(change, message):
    with pytest.raises(InputError, match=message):
        GenerationConfig(do_sample=True, **change)


def test_a_tiny_temperature_samples_the_argmax_without_nan():
    """1/temperature overflows to inf for 1e-300: the sampler shifts the scores first (the same
    distribution), so it picks the argmax instead of failing on NaN probabilities."""
    logits = np.array([1.0, 3.0, 2.5, -4.0], np.float32)
    s = Sampler(GenerationConfig(do_sample=True, temperature=1e-300, seed=0), eos_ids=(0,))
    assert [s(logits) for _ in range(5)] == [1] * 5


def test_a_bad_generation_entry_is_the_bundles_fault_and_an_override_the_users():
    from vlm2om.runtime.errors import BundleError

    for entry in ({"top_p": 0}, {"max_new_tokens": "300"}, {"stop_strings": 5}):
        with pytest.raises(BundleError, match="the manifest's generation entry cannot be used"):
            GenerationConfig.from_manifest(entry)
    assert GenerationConfig.from_manifest({"top_p": 0.9}, top_p=None, seed=3) == GenerationConfig(top_p=0.9, seed=3)
    with pytest.raises(InputError, match="top_p must be in"):
        GenerationConfig.from_manifest({"top_p": 0.9}, top_p=2.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_invalid_score_guard_as_chatglm(bad):
    """ChatGLM's InvalidScoreLogitsProcessor (values worked out by hand): any NaN or inf makes the
    scores zeros with 5e4 at id 5, so greedy and sampling both choose 5; finite logits pass as they are."""
    logits = np.array([0.0, 3.0, 1.0, bad, 2.0, -1.0, 0.5])
    for cfg in (GenerationConfig(invalid_score_token=5),
                GenerationConfig(invalid_score_token=5, do_sample=True, top_k=3, top_p=0.7, seed=0)):
        assert Sampler(cfg, eos_ids=(2,))(logits) == 5
    assert Sampler(GenerationConfig(invalid_score_token=5), eos_ids=(2,))(np.array([0.0, 3.0, 1.0])) == 1
    assert Sampler(GenerationConfig(), eos_ids=(2,))(np.array([0.0, 3.0, 1.0, float("-inf")])) == 1  # no guard


def test_max_length_counts_the_prompt():
    """ChatGLM's max_length: prompt + answer positions; 10 prompt positions and max_length 13 leave 3."""
    from vlm2om.runtime.decoding import Answer, Sequence

    class Tok:
        def stream(self):
            return self

        def push(self, token):
            return "x"

    cfg = GenerationConfig(max_new_tokens=50, max_length=13, stop_on_eos=False)
    seq = Sequence(cfg, (2,), (), Tok(), Answer(prompt_tokens=10))
    steps = [seq.take(np.array([0.0, 1.0, 0.0]), False) for _ in range(3)]
    assert steps == [1, 1, None] and seq.res.finish_reason == "length" and len(seq.res.tokens) == 3
    with pytest.raises(InputError, match="max_length"):
        GenerationConfig(max_length=1)
