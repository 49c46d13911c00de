"""ChatGLM through the runtime: a tiny bundle exported from exporters/llm/chatglm.py's specs (embed
and two decoder groups of two layers, per-layer KV) run by ``runtime.decoder.Decoder`` on
onnxruntime with the 2-D positions of ``pipeline.positions.kind = glm_2d``: a one-chunk prefill
of a context ending in [gMASK] <sop>, then greedy steps through the host-owned cache, each step's
logits against SwissArmyTransformer's full recompute of the whole sequence (same weights).

The positions rule itself is checked against SAT's ``get_inputs`` and against
tests/helpers/chatglm_sat.py's ``glm_positions`` (which tests/graphs/test_chatglm.py checks against SAT).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers.chatglm_bundle import open_decoder, split_group, write_chatglm_bundle
from tests.helpers.chatglm_sat import build_sat_chatglm, glm_ids, glm_positions, load_into_sat, round_sat_inv_freq, \
    sat_or_skip
from tests.helpers.hf_weights import close, randomize
from vlm2om.graphs.chatglm import ChatGLMConfig, ChatGLMDecoderGroup, ChatGLMEmbedding
from vlm2om.runtime import BundleError
from vlm2om.runtime.bundle import Bundle
from vlm2om.runtime.decoder import TWO_D, glm_2d
from vlm2om.runtime.manifest_pipeline import check_pipeline
from vlm2om.runtime.manifest_types import Checker
from vlm2om.runtime.schema import POSITIONS, POSITIONS_2D

TINY = dict(vocab_size=128, hidden=64, layers=4, heads=4, ffn=160, max_positions=64,
            rope_precision="fp16_inv_freq")
BOUNDS = [(0, 2), (2, 4)]
SEQ, CACHE = [1, 12], [16, 32]
ATOL = 1e-4  # fp32: onnxruntime's kernels vs SAT's torch ones
STEPS = 5


def test_glm_2d_is_the_reference_rule_with_padding_and_empty_rows():
    """Prompts of P positions ([gMASK] at P - 2, <sop> at P - 1): the context counts, every
    position from <sop> on (padding included) has the [gMASK] index and counting block
    positions; an unused batch row (prefix 0) gets its plain positions."""
    total = 14
    got = glm_2d(np.broadcast_to(np.arange(total), (3, total)), np.array([9, 4, 0]))
    assert got.shape == (3, 2, total) and got.dtype == np.int64
    for row, p in enumerate((9, 4)):
        assert np.array_equal(got[row], glm_positions(p - 1, total).numpy())
    assert np.array_equal(got[2], np.stack([np.arange(total), np.zeros(total, np.int64)]))
    # A decode step: one position per row, past the prompt.
    step = glm_2d(np.array([[9], [6]]), np.array([9, 4]))
    assert step[:, :, 0].tolist() == [[7, 2], [2, 4]]
    assert set(TWO_D) == set(POSITIONS) and {k for k, f in TWO_D.items() if f} == set(POSITIONS_2D)


@torch.no_grad()
def test_glm_2d_matches_sat_get_inputs():
    sat_or_skip()
    sat = build_sat_chatglm(ChatGLMConfig(**TINY))
    ids = torch.stack([glm_ids([5, 6, 7, 8, 9, 10], [11, 12]), glm_ids([5, 6, 7], [11, 12, 13, 14, 15])])
    _, positions = sat.get_inputs(ids)
    total = ids.shape[1]
    ours = glm_2d(np.broadcast_to(np.arange(total), (2, total)), np.array([8, 5]))  # text + [gMASK] + <sop>
    assert np.array_equal(ours, positions.numpy())


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    """(cfg, SAT model, the runtime's Decoder, its Bundle) with the same random weights."""
    sat_or_skip()
    cfg = ChatGLMConfig(**TINY)
    ours = randomize(nn.ModuleDict({"embed": ChatGLMEmbedding(cfg), "group": ChatGLMDecoderGroup(cfg, 0, cfg.layers, kv_layout="per_layer")}),
                     seed=11, std=0.1)
    sat = build_sat_chatglm(cfg)
    load_into_sat(ours, sat, cfg)
    round_sat_inv_freq(sat)
    groups = split_group(cfg, ours["group"], BOUNDS)
    bundle, _ = write_chatglm_bundle(tmp_path_factory.mktemp("chatglm"), cfg, ours["embed"].eval(), groups,
                                            BOUNDS, SEQ, CACHE, batches=(1, 2))
    return cfg, sat, open_decoder(bundle), bundle


def test_manifest_passes_the_pipeline_check(glm):
    m = glm[3].manifest
    c = Checker()
    check_pipeline(c, m["pipeline"], m["graphs"], m["graphs"], m["kv_cache"], None)
    assert c.problems == []
    roles = {s["role"]: s["shape"] for s in m["graphs"]["decoder_0"]["inputs"]}
    assert roles["positions_2d"] == ["batch", 2, "seq"] and "positions" not in roles
    for change, message in ((dict(attention="causal"), "not 'prefix_lm'"),
                            (dict(positions={"kind": "linear"}), "computes no 2-D positions"),
                            (dict(positions={"kind": "glm_3d"}), "positions kind 'glm_3d'")):
        c = Checker()
        check_pipeline(c, {**m["pipeline"], **change}, m["graphs"], m["graphs"], m["kv_cache"], None)
        assert any(message in p for p in c.problems), c.problems


@torch.no_grad()
def sat_last_logits(sat, ids: list[int]) -> torch.Tensor:
    return sat(input_ids=torch.tensor([ids]))[0][0, -1]


def greedy_against_sat(sat, dec, texts: list[list[int]]) -> list[float]:
    """Prefill every row's [text, gMASK, sop] in one batch, then STEPS greedy steps, comparing
    every row's logits at every step with SAT's full recompute; the max abs diffs."""
    seqs = [glm_ids(t, []).tolist() for t in texts]
    cache = dec.new_cache(len(seqs))
    logits = dec.prefill([dec.embed(s) for s in seqs], cache)
    diffs = []
    for step in range(STEPS + 1):
        for b, s in enumerate(seqs):
            diffs.append(close(torch.from_numpy(logits[b]), sat_last_logits(sat, s), f"step {step} row {b}", ATOL))
        if step == STEPS:
            break
        nxt = [int(np.argmax(logits[b])) for b in range(len(seqs))]
        for s, t in zip(seqs, nxt):
            s.append(t)
        logits = dec.step(cache, nxt, [len(s) - 1 for s in seqs])
    return diffs


def test_decoder_prefill_and_greedy_steps_match_sat(glm):
    cfg, sat, dec, _ = glm
    assert not dec.reuses_prefix
    diffs = greedy_against_sat(sat, dec, [[17, 23, 29, 31, 37, 41, 43]])
    print(f"[chatglm runtime] batch 1: max abs diff {max(diffs):.2e} over {len(diffs)} logits rows")


def test_batch_of_two_rows_of_different_lengths_matches_sat(glm):
    """Row 1 is right-padded in the prefill (its padding keeps counting block positions)."""
    _, sat, dec, _ = glm
    assert 2 in dec.batch_gears
    diffs = greedy_against_sat(sat, dec, [[9, 8, 7, 6, 5, 4, 3, 90, 91], [50, 60, 70]])
    print(f"[chatglm runtime] batch 2: max abs diff {max(diffs):.2e} over {len(diffs)} logits rows")



def test_decoder_refuses_positions_it_cannot_compute(glm):
    """A positions_2d input under the linear kind, or an unknown kind, fails when the Decoder opens."""
    bundle = glm[3]
    for kind, message in (("linear", "gives none"), ("glm_3d", "positions kind 'glm_3d' is not known")):
        changed = copy.deepcopy(bundle.manifest)
        changed["pipeline"]["positions"] = {"kind": kind}
        with pytest.raises(BundleError, match=message):
            open_decoder(Bundle(bundle.root, changed))
