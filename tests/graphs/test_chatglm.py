"""graphs/chatglm.py vs SwissArmyTransformer's ``ChatGLMModel`` (the code VisualGLM-6B runs on):
a prefix-LM prefill of a [gMASK]<sop> context, decode steps through our KV contract with the cache
kept host-side (scattered slots, garbage elsewhere), and a second chunk of several tokens, each
against SAT's full recompute of the whole sequence with the same weights.

SAT is composed from its public classes (``get_args`` + ``ChatGLMModel``) with random weights that
are copied from our modules by an explicit name table (tests/helpers/chatglm_sat.py). The SAT
tests skip where SAT is not installed; the rest (rope tables, layer groups, fp16, ONNX) always run.
Tiny sizes, float32, eval().
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers.chatglm_sat import (PAD, build_sat_chatglm, glm_ids, glm_positions, load_into_sat,
                                       round_sat_inv_freq, sat_or_skip)
from tests.helpers.chatglm_bundle import split_group
from tests.helpers.hf_weights import close, randomize
from tests.helpers.onnx_checks import check_onnx_group
from vlm2om.exporters.core.subgraph import Subgraph, TensorDecl
from vlm2om.graphs.chatglm import ChatGLMConfig, ChatGLMDecoderGroup, ChatGLMEmbedding, rope_table
from vlm2om.graphs.common import cast_module

TINY = dict(vocab_size=128, hidden=64, layers=3, heads=4, ffn=160, max_positions=64)
ATOL = 2e-5
DIFFS: dict[str, float] = {}  # the largest max abs diff per case so far, printed with -s


def ours_pair(cfg: ChatGLMConfig, seed: int) -> nn.ModuleDict:
    m = nn.ModuleDict({"embed": ChatGLMEmbedding(cfg), "group": ChatGLMDecoderGroup(cfg, 0, cfg.layers, kv_layout="per_layer")})
    return randomize(m, seed, std=0.1)


def with_sat(precision: str, seed: int = 0):
    sat_or_skip()
    cfg = ChatGLMConfig(**TINY, rope_precision=precision)
    ours = ours_pair(cfg, seed)
    sat = build_sat_chatglm(cfg)
    load_into_sat(ours, sat, cfg)
    if precision == "fp16_inv_freq":
        round_sat_inv_freq(sat)
    return cfg, ours, sat


def empty_cache(cfg: ChatGLMConfig, batch: int, cap: int = 0, layers: int | None = None):
    n = cfg.layers if layers is None else layers
    shape = (batch, cfg.heads, cap, cfg.head_dim)
    return torch.zeros(batch, cap), [torch.zeros(shape) for _ in range(2 * n)]


def cache_args(cfg: ChatGLMConfig, batch: int, layers: int) -> list[torch.Tensor]:
    mask, past = empty_cache(cfg, batch, layers=layers)
    return [mask, *past]


def sat_run(sat, ids: torch.Tensor):
    """SAT's full recompute of one sequence: logits [T, V] and per layer (keys, values) [T, heads, D]."""
    out = sat(input_ids=ids[None])
    return out[0][0], [(d["past_key_values"][0][:, 0], d["past_key_values"][1][:, 0]) for d in out[1:]]


def record(name: str, diff: float) -> float:
    DIFFS[name] = max(diff, DIFFS.get(name, 0.0))
    print(f"[chatglm oracle] {name}: max abs diff {DIFFS[name]:.2e}")
    return diff


@torch.no_grad()
def test_positions_and_prefix_mask_match_sat():
    """Our positions and our mask rule (block_j <= block_i) are SAT's get_inputs for a batch."""
    _, _, sat = with_sat("fp32")
    ids = torch.stack([glm_ids([5, 6, 7, 8, 9, 10], [11, 12]), glm_ids([5, 6, 7], [11, 12, 13, 14, 15])])
    mask, positions = sat.get_inputs(ids)
    total = ids.shape[1]
    ours = torch.stack([glm_positions(6 + 1, total), glm_positions(3 + 1, total)])
    assert torch.equal(positions, ours)
    block = ours[:, 1]
    visible = (block[:, None, :] <= block[:, :, None]).float().unsqueeze(1)
    assert torch.equal(mask, visible)


@pytest.mark.parametrize("precision", ["fp32", "fp16_inv_freq"])
@torch.no_grad()
def test_prefill_then_decode_matches_sat(precision):
    cfg, ours, sat = with_sat(precision, seed=1)
    gen = torch.Generator().manual_seed(2)
    texts = [[int(t) for t in torch.randint(4, 110, (n,), generator=gen)] for n in (4, 7)]
    steps = 4
    answers = [[int(t) for t in torch.randint(4, 110, (steps,), generator=gen)] for _ in texts]
    seqs = [glm_ids(t, a) for t, a in zip(texts, answers)]
    refs = [sat_run(sat, s) for s in seqs]
    context = [len(t) + 1 for t in texts]  # text + [gMASK]; <sop> at index context
    prompt = [c + 1 for c in context]  # what the prefill feeds: the context and <sop>
    B, S, C = len(seqs), max(prompt) + 1, 16  # one padding position at least

    # Prefill: one chunk of the whole context + <sop>, right-padded, positions counting on.
    ids = torch.full((B, S), PAD)
    pos = torch.stack([glm_positions(c, S) for c in context])
    for b, s in enumerate(seqs):
        ids[b, : prompt[b]] = s[: prompt[b]]
    emb = ours["embed"](ids)
    mask0, past0 = empty_cache(cfg, B)
    logits, *present = ours["group"](emb, pos, mask0, *past0)
    for b in range(B):
        n = prompt[b]
        record(f"{precision} prefill logits (all positions)", close(logits[b, :n], refs[b][0][:n], "prefill", ATOL))
        for i, (k, v) in enumerate(refs[b][1]):
            close(present[2 * i][b, :, :n], k[:n].transpose(0, 1), f"row {b} layer {i} keys (after RoPE)", ATOL)
            close(present[2 * i + 1][b, :, :n], v[:n].transpose(0, 1), f"row {b} layer {i} values", ATOL)
    last, *_ = ours["group"](emb, pos, mask0, *past0, torch.tensor(prompt) - 1)
    for b in range(B):
        record(f"{precision} prefill logits at <sop>", close(last[b], refs[b][0][prompt[b] - 1], "at <sop>", ATOL))

    # Host-side cache: the prompt's keys/values in scattered slots, large garbage everywhere else.
    cache = [torch.randn(B, cfg.heads, C, cfg.head_dim, generator=gen) * 50 for _ in present]
    valid = torch.zeros(B, C)
    free = []
    for b in range(B):
        order = torch.randperm(C, generator=gen)
        slots, free_b = order[: prompt[b]], order[prompt[b]:]
        for c, p in zip(cache, present):
            c[b, :, slots] = p[b, :, : prompt[b]]
        valid[b, slots] = 1.0
        free.append(list(free_b))
    # Decode: one token per step (the previous answer token), its KV written into a free slot.
    for step in range(steps):
        index = [prompt[b] + step for b in range(B)]
        tok = torch.stack([seqs[b][index[b]: index[b] + 1] for b in range(B)])
        step_pos = torch.stack([glm_positions(context[b], index[b] + 1)[:, -1:] for b in range(B)])
        out, *new = ours["group"](ours["embed"](tok), step_pos, valid, *cache, torch.zeros(B, dtype=torch.long))
        for b in range(B):
            record(f"{precision} decode-step logits", close(out[b], refs[b][0][index[b]], f"step {step} row {b}", ATOL))
            slot = free[b].pop(0)
            for c, p in zip(cache, new):
                c[b, :, slot] = p[b, :, 0]
            valid[b, slot] = 1.0


@torch.no_grad()
def test_second_chunk_of_answer_tokens_matches_sat():
    """After the prompt's chunk, several answer tokens in one chunk (teacher forcing, or a prompt
    continued): causal among themselves by block position, the padding invisible."""
    cfg, ours, sat = with_sat("fp16_inv_freq", seed=3)
    text, answer = [17, 23, 29, 31, 37], [41, 43, 47]
    seq = glm_ids(text, answer)
    ref_logits, _ = sat_run(sat, seq)
    context, prompt, n2 = len(text) + 1, len(text) + 2, len(answer)
    pos = glm_positions(context, len(seq) + 1)[None]  # one padding position after the answer
    mask0, past0 = empty_cache(cfg, 1)
    _, *kv = ours["group"](ours["embed"](seq[None, :prompt]), pos[..., :prompt], mask0, *past0)
    chunk = torch.cat([seq[prompt:], torch.tensor([PAD])])[None]
    logits, *_ = ours["group"](ours["embed"](chunk), pos[..., prompt:], torch.ones(1, prompt), *kv)
    record("second chunk logits", close(logits[0, :n2], ref_logits[prompt:], "second chunk", ATOL))


@torch.no_grad()
def test_groups_chain_like_one_group():
    cfg = ChatGLMConfig(**TINY)
    full = ours_pair(cfg, seed=4)["group"]
    B, S = 2, 6
    h = torch.randn(B, S, cfg.hidden, generator=torch.Generator().manual_seed(5))
    pos = torch.stack([glm_positions(4, S), glm_positions(3, S)])
    logits, *present = full(h, pos, *cache_args(cfg, B, cfg.layers))
    for k in range(1, cfg.layers):
        head, tail = split_group(cfg, full, [(0, k), (k, cfg.layers)])
        assert [layer.attention.coeff for layer in tail.layers] == [float(i + 1) for i in range(k, cfg.layers)]
        mid, *kv1 = head(h, pos, *cache_args(cfg, B, k))
        out, *kv2 = tail(mid, pos, *cache_args(cfg, B, cfg.layers - k))
        close(out, logits, f"groups [0,{k})+[{k},{cfg.layers}) vs one group", 1e-6)
        for a, b in zip([*kv1, *kv2], present):
            close(a, b, f"chained present split at {k}", 1e-6)


@torch.no_grad()
def test_stacked_cache_equals_per_layer():
    """The stacked layout (one past_kv per group) computes what the per-layer one does."""
    cfg = ChatGLMConfig(**TINY)
    per_layer = ours_pair(cfg, seed=6)["group"]
    stacked = ChatGLMDecoderGroup(cfg, 0, cfg.layers, kv_layout="stacked")
    stacked.load_state_dict(per_layer.state_dict())
    gen = torch.Generator().manual_seed(7)
    B, S, C = 2, 3, 5
    h = torch.randn(B, S, cfg.hidden, generator=gen)
    past = torch.randn(cfg.layers, 2, B, cfg.heads, C, cfg.head_dim, generator=gen)
    mask = torch.ones(B, C)
    mask[1, 3:] = 0
    pos = torch.stack([glm_positions(2, C + S)[:, C:], glm_positions(3, C + S)[:, C:]])
    want, *kv = per_layer(h, pos, mask, *[past[j // 2, j % 2] for j in range(2 * cfg.layers)])
    got, present = stacked(h, pos, mask, past)
    close(got, want, "stacked logits", 0)
    close(present, torch.stack([torch.stack(kv[2 * i:2 * i + 2]) for i in range(cfg.layers)]), "stacked present", 0)


def test_rope_tables_round_as_the_originals():
    """fp16: the HF code run in fp16 (fp16 positions, inv_freq, angles, cos/sin) within one fp16
    ulp; fp16_inv_freq: the HF code run in fp32 (rounded inv_freq, fp32 angles)."""
    rd, length = 64, 2048
    inv = 1.0 / (10000.0 ** (torch.arange(0, rd, 2).float() / rd))
    freqs = torch.einsum("i,j->ij", torch.arange(length, dtype=torch.half), inv.half())
    emb = torch.cat([freqs, freqs], dim=-1)
    cos16, sin16 = rope_table(rd, length, 10000.0, "fp16")
    assert (cos16 - emb.cos().float()).abs().max() <= 2 ** -11
    assert (sin16 - emb.sin().float()).abs().max() <= 2 ** -11
    assert torch.equal(cos16.half().float(), cos16)
    freqs32 = torch.einsum("i,j->ij", torch.arange(length, dtype=torch.float32), inv.half().float())
    cos_h, _ = rope_table(rd, length, 10000.0, "fp16_inv_freq")
    cos32, _ = rope_table(rd, length, 10000.0, "fp32")
    assert (cos_h - torch.cat([freqs32, freqs32], -1).cos()).abs().max() < 1e-5
    # The three roundings differ where ChatGLM's positions go (up to 2048).
    assert (cos_h - cos32).abs().max() > 1e-3 and (cos16 - cos_h).abs().max() > 1e-2
    with pytest.raises(ValueError):
        ChatGLMConfig(rope_precision="bf16")


def test_real_size_config():
    cfg = ChatGLMConfig()
    assert (cfg.head_dim, cfg.rotary_dim, round(cfg.alpha, 4)) == (128, 64, 7.4833)
    g = ChatGLMDecoderGroup(ChatGLMConfig(**{**TINY, "layers": 28}), 26, 28)
    assert [layer.attention.coeff for layer in g.layers] == [27.0, 28.0] and g.is_last
    with pytest.raises(ValueError):
        ChatGLMDecoderGroup(cfg, 3, 29)


@torch.no_grad()
def test_fp16_group_runs_close_to_fp32():
    """fp16 activations (LayerNorms and softmax in fp32), as ATC's force_fp16 will run it."""
    cfg = ChatGLMConfig(**TINY)
    full = ours_pair(cfg, seed=6)
    ids = glm_ids([9, 8, 7, 6], [5, 4])[None]
    pos = glm_positions(5, ids.shape[1])[None]
    emb = full["embed"](ids)
    ref, *_ = full["group"](emb, pos, *cache_args(cfg, 1, cfg.layers))
    half = cast_module(full["group"], torch.float16)
    got, *kv = half(emb.half(), pos, *[t.half() for t in cache_args(cfg, 1, cfg.layers)])
    assert got.dtype == torch.float32 and kv[0].dtype == torch.float16
    assert torch.isfinite(got).all() and (got - ref).abs().max() < 2e-2 * ref.abs().max()


def decoder_subgraph(cfg: ChatGLMConfig, group: ChatGLMDecoderGroup) -> Subgraph:
    n = len(group.layers)
    kv = [f"{kind}_{i}" for i in range(n) for kind in ("key", "value")]
    kv_dims = ("batch", cfg.heads, "cache", cfg.head_dim)
    inputs = [TensorDecl("hidden_states", "float32", ("batch", "seq", cfg.hidden)),
              TensorDecl("position_ids", "int64", ("batch", 2, "seq")),
              TensorDecl("attention_mask", "float32", ("batch", "cache")),
              *(TensorDecl(f"past_{k}", "float32", kv_dims) for k in kv),
              TensorDecl("logits_index", "int64", ("batch",))]
    outputs = [TensorDecl("logits", "float32", ("batch", cfg.vocab_size)),
               *(TensorDecl(f"present_{k}", "float32", ("batch", cfg.heads, "seq", cfg.head_dim)) for k in kv)]

    def make_inputs(g, gen):
        b, s, c = g["batch"], g["seq"], g["cache"]
        feeds = {"hidden_states": torch.randn(b, s, cfg.hidden, generator=gen),
                 "position_ids": torch.randint(0, cfg.max_positions, (b, 2, s), generator=gen),
                 "attention_mask": (torch.rand(b, c, generator=gen) > 0.3).float(),
                 "logits_index": torch.randint(0, s, (b,), generator=gen)}
        feeds.update({f"past_{k}": torch.randn(b, cfg.heads, c, cfg.head_dim, generator=gen) for k in kv})
        return feeds

    return Subgraph(name="decoder", build=lambda: group, inputs=inputs, outputs=outputs, make_inputs=make_inputs,
                    gears=[{"batch": 1, "seq": 1, "cache": 8}, {"batch": 2, "seq": 5, "cache": 12}])


@torch.no_grad()
def test_onnx_opset13_matches_torch(tmp_path):
    cfg = ChatGLMConfig(**TINY)
    group = ours_pair(cfg, seed=7)["group"]
    sg = decoder_subgraph(cfg, group)
    for diff in check_onnx_group(sg, group, tmp_path):
        record("onnxruntime vs torch", diff)
