"""graphs/internlm2.py (InternLM2 + Partial LoRA, InternLM-XComposer2's LLM) against two oracles:

* with PLoRA off (im_mask all 0) InternLM2 is Llama with a packed, group-interleaved ``wqkv``:
  transformers' ``LlamaForCausalLM`` with the same weights, ``wqkv`` unpacked into q/k/v_proj by
  the explicit row table ``wqkv_rows`` ([q x p | k | v] per KV group); prefill with right padding,
  the KV cache it returns, and decode steps over a cache with scattered valid slots;
* with PLoRA on: ``plora_reference``, a full-sequence torch model written here from the original's
  facts (``res[im_mask] += Plora_B(Plora_A(x[im_mask])) * alpha / r`` with boolean indexing, the
  ``rearrange`` of the grouped qkv, ``cos[:L]`` RoPE, repeat_kv, finfo.min causal mask), with the
  mask on some, none or all positions and r/alpha that differ per projection kind.

Then an ONNX export of a group (opset 13, lint clean, onnxruntime equal to torch). Tiny sizes,
float32, eval(), eager attention.
"""
from __future__ import annotations

import math

import pytest
import torch
import transformers as T
from torch import nn
from torch.nn import functional as F

from tests.helpers.hf_weights import close, randomize
from tests.helpers.onnx_checks import check_onnx_group
from vlm2om.exporters.core.subgraph import Subgraph, TensorDecl
from vlm2om.graphs.common import cast_module
from vlm2om.graphs.internlm2 import (InternLM2Config, InternLM2DecoderGroup, InternLM2Embedding, lora_table,
                                     rope_table)

# GQA 4 -> 2: each KV group's wqkv block is [q, q, k, v].
TINY = dict(vocab_size=96, hidden=64, layers=3, heads=4, kv_heads=2, ffn=112, rms_eps=1e-5,
            rope_theta=1e6, max_positions=64)
# Different r and alpha per kind (scalings 2, 0.75, 1, 0.6, 1.5), as the checkpoints may have.
MIXED_LORA = lora_table((6, 6), wqkv=(4, 8), wo=(8, 6), w2=(5, 3), w3=(2, 3))
ATOL = 2e-5


def ours(cfg: InternLM2Config, seed: int) -> nn.ModuleDict:
    m = nn.ModuleDict({"embed": InternLM2Embedding(cfg), "group": InternLM2DecoderGroup(cfg, 0, cfg.layers)})
    randomize(m, seed)
    with torch.no_grad():  # LoRA branches of a visible size (B is zero-initialised in training)
        for name, p in m.named_parameters():
            if "Plora_" in name:
                p.mul_(4.0)
    return m.eval()


def wqkv_rows(cfg: InternLM2Config) -> list[tuple[int, int, str, int, int]]:
    """The explicit unpacking: (wqkv row start, stop, HF projection, its row start, stop). The
    wqkv rows are KV group after KV group, each [q_0 .. q_{p-1} | k | v] of head_dim rows."""
    d, p = cfg.head_dim, cfg.q_per_kv
    table = []
    for grp in range(cfg.kv_heads):
        base = grp * (p + 2) * d
        for j in range(p):
            head = grp * p + j
            table.append((base + j * d, base + (j + 1) * d, "q_proj", head * d, (head + 1) * d))
        table.append((base + p * d, base + (p + 1) * d, "k_proj", grp * d, (grp + 1) * d))
        table.append((base + (p + 1) * d, base + (p + 2) * d, "v_proj", grp * d, (grp + 1) * d))
    return table


# Our leaf -> HF leaf for everything but wqkv (unpacked by wqkv_rows) and the PLoRA branches
# (which HF does not have: they must not matter while im_mask is 0).
LEAVES = {"attention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
          "attention.wo.weight": "self_attn.o_proj.weight", "feed_forward.w1.weight": "mlp.gate_proj.weight",
          "feed_forward.w3.weight": "mlp.up_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight"}


def hf_llama(cfg: InternLM2Config, m: nn.ModuleDict) -> T.LlamaForCausalLM:
    hf = T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, intermediate_size=cfg.ffn,
        rms_norm_eps=cfg.rms_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        max_position_embeddings=cfg.max_positions, tie_word_embeddings=False, attention_bias=False,
        attn_implementation="eager"))
    assert hf.config._attn_implementation == "eager"
    src, dst = dict(m.named_parameters()), dict(hf.named_parameters())
    used = set()
    with torch.no_grad():
        for p in dst.values():
            p.fill_(float("nan"))

        def put(ours_name, hf_name, rows=None, hf_rows=None):
            value = src[ours_name] if rows is None else src[ours_name][rows[0]:rows[1]]
            target = dst[hf_name] if hf_rows is None else dst[hf_name][hf_rows[0]:hf_rows[1]]
            assert value.shape == target.shape, (ours_name, hf_name)
            assert not torch.isfinite(target).any(), f"{hf_name} {hf_rows} written twice"
            target.copy_(value)
            used.add(ours_name)

        put("embed.tok_embeddings.weight", "model.embed_tokens.weight")
        put("group.norm.weight", "model.norm.weight")
        put("group.output.weight", "lm_head.weight")
        for i in range(cfg.layers):
            for leaf, hf_leaf in LEAVES.items():
                put(f"group.layers.{i}.{leaf}", f"model.layers.{i}.{hf_leaf}")
            for a, b, proj, c, e in wqkv_rows(cfg):
                put(f"group.layers.{i}.attention.wqkv.weight", f"model.layers.{i}.self_attn.{proj}.weight",
                    (a, b), (c, e))
    left = [n for n, p in dst.items() if torch.isnan(p).any()]
    assert not left, f"HF parameters (partly) not written: {left}"
    assert set(src) - used == {n for n in src if "Plora_" in n}, set(src) - used
    return hf.eval()


def empty_cache(cfg, batch: int, cap: int = 0):
    return torch.zeros(batch, cap), torch.zeros(cfg.layers, 2, batch, cfg.kv_heads, cap, cfg.head_dim)


def test_wqkv_table_covers_every_row_once():
    cfg = InternLM2Config(**TINY)
    table = wqkv_rows(cfg)
    assert sorted(r for a, b, *_ in table for r in range(a, b)) == list(range((cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim))
    # The first KV group's block is [q0 | q1 | k0 | v0] at toy size.
    assert [(a, proj, c) for a, _, proj, c, _ in table[:4]] == [(0, "q_proj", 0), (16, "q_proj", 16),
                                                                (32, "k_proj", 0), (48, "v_proj", 0)]


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["q2_per_kv", "q4_per_kv"])  # 4 per KV head as in the 7B
@torch.no_grad()
def test_base_model_matches_hf_llama_with_padding_and_decode(kv_heads):
    cfg = InternLM2Config(**{**TINY, "kv_heads": kv_heads})
    m = ours(cfg, seed=0)
    hf = hf_llama(cfg, m)
    torch.manual_seed(1)
    B, S, lens = 2, 7, [7, 4]
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    emb = m["embed"](ids)
    pos = torch.arange(S).expand(B, S).contiguous()  # right padding keeps counting
    no_image = torch.zeros(B, S)
    logits, present = m["group"](emb, pos, *empty_cache(cfg, B)[:1], no_image, empty_cache(cfg, B)[1])
    assert present.shape == (cfg.layers, 2, B, cfg.kv_heads, S, cfg.head_dim)
    for b, n in enumerate(lens):
        ref = hf(input_ids=ids[b:b + 1, :n], use_cache=True, output_hidden_states=True)
        close(emb[b:b + 1, :n], ref.hidden_states[0], "inputs_embeds")
        close(logits[b:b + 1, :n], ref.logits, f"prefill logits row {b}", ATOL)
        for i, layer in enumerate(ref.past_key_values.layers):
            close(present[i, 0, b:b + 1, :, :n], layer.keys, f"row {b} layer {i} keys (after RoPE)", ATOL)
            close(present[i, 1, b:b + 1, :, :n], layer.values, f"row {b} layer {i} values", ATOL)
    # Decode steps over a cache of capacity cap: the prefill's valid slots scattered, the padding's
    # slots (row 1) and everything else garbage.
    cap, steps = 11, 3
    past = torch.randn(cfg.layers, 2, B, cfg.kv_heads, cap, cfg.head_dim) * 50
    mask = torch.zeros(B, cap)
    for b, n in enumerate(lens):
        slots = torch.randperm(cap)[:n]
        past[:, :, b, :, slots] = present[:, :, b, :, :n]
        mask[b, slots] = 1.0
    seqs = [ids[b, :n] for b, n in enumerate(lens)]
    for step in range(steps):
        nxt = torch.randint(0, cfg.vocab_size, (B, 1))
        step_pos = torch.tensor([[len(s)] for s in seqs])
        got, kv = m["group"](m["embed"](nxt), step_pos, mask, torch.zeros(B, 1), past)
        for b in range(B):
            seqs[b] = torch.cat([seqs[b], nxt[b]])
            ref = hf(input_ids=seqs[b][None]).logits[:, -1:]
            close(got[b:b + 1], ref, f"decode step {step} row {b}", ATOL)
            free = torch.nonzero(mask[b] == 0).flatten()[0]
            past[:, :, b, :, free] = kv[:, :, b, :, 0]
            mask[b, free] = 1.0


@torch.no_grad()
def test_layer_groups_chain_and_kv_layouts_agree():
    cfg = InternLM2Config(**TINY, lora=MIXED_LORA)
    m = ours(cfg, seed=2)
    full = m["group"]
    torch.manual_seed(3)
    B, S = 2, 6
    emb, pos = torch.randn(B, S, cfg.hidden), torch.arange(S).expand(B, S).contiguous()
    im = torch.zeros(B, S)
    im[0, 1:4], im[1, :5] = 1.0, 1.0
    mask, past = empty_cache(cfg, B)
    want, present = full(emb, pos, mask, im, past)
    head, tail = InternLM2DecoderGroup(cfg, 0, 1), InternLM2DecoderGroup(cfg, 1, cfg.layers, kv_layout="per_layer")
    state = full.state_dict()
    head.load_state_dict({k: v for k, v in state.items() if k.startswith("layers.0.")})
    tail.load_state_dict({(f"layers.{int(k.split('.')[1]) - 1}." + k.split(".", 2)[2] if k.startswith("layers.") else k): v
                          for k, v in state.items() if not k.startswith("layers.0.")})
    h, kv0 = head.eval()(emb, pos, mask, im, past[:1])
    got, *kv = tail.eval()(h, pos, mask, im, *past[1:].flatten(0, 1).unbind(0))
    close(got, want, "groups [0,1) + [1,3) (per_layer) vs one group", 1e-6)
    close(torch.cat([kv0, torch.stack(kv).unflatten(0, (cfg.layers - 1, 2))]), present, "present kv", 1e-6)
    assert {k for k, _ in tail.named_parameters()} >= {"layers.0.attention.wqkv.Plora_A.weight", "norm.weight",
                                                       "output.weight", "layers.1.feed_forward.w2.Plora_B.weight"}


# ------------------------------------------------------------------ PLoRA: the independent reference

def plora_reference(cfg: InternLM2Config, state: dict, emb: torch.Tensor, im_mask: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits [B, L, V] written from the original's facts (positions 0..L-1, no
    padding): PLoRA by boolean indexing, the 'b q (h gs d) -> b q h gs d' view of wqkv, repeat_kv."""
    d, p, g, h = cfg.head_dim, cfg.q_per_kv, cfg.kv_heads, cfg.heads
    B, L, _ = emb.shape
    sd = {k.removeprefix("group."): v for k, v in state.items()}

    def rms(x, w):
        v = x.float().pow(2).mean(-1, keepdim=True)
        return w * (x.float() * torch.rsqrt(v + cfg.rms_eps)).to(x.dtype)

    def plora(x, name, kind):
        r, alpha = cfg.lora_of(kind)
        flat = x.reshape(-1, x.shape[-1])
        res = flat @ sd[f"{name}.weight"].T
        if f"{name}.bias" in sd:  # config.bias: wqkv and wo
            res = res + sd[f"{name}.bias"]
        sel = im_mask.reshape(-1)
        if sel.any():
            part = flat[sel]
            res[sel] += (part @ sd[f"{name}.Plora_A.weight"].T) @ sd[f"{name}.Plora_B.weight"].T * (alpha / r)
        return res.reshape(B, L, -1)

    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.einsum("i,j->ij", torch.arange(L).float(), inv_freq)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

    def rotate_half(x):
        return torch.cat([-x[..., d // 2:], x[..., :d // 2]], dim=-1)

    causal = torch.full((L, L), torch.finfo(torch.float32).min).triu(1)
    x = emb
    for i in range(cfg.layers):
        pre = f"layers.{i}."
        a = rms(x, sd[pre + "attention_norm.weight"])
        qkv = plora(a, pre + "attention.wqkv", "wqkv").reshape(B, L, g, p + 2, d)
        q = qkv[..., :p, :].reshape(B, L, h, d).transpose(1, 2)
        k, v = qkv[..., -2, :].transpose(1, 2), qkv[..., -1, :].transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(p, dim=1), v.repeat_interleave(p, dim=1)
        w = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(d) + causal
        o = torch.matmul(torch.softmax(w, dim=-1, dtype=torch.float32), v).transpose(1, 2).reshape(B, L, h * d)
        x = x + plora(o, pre + "attention.wo", "wo")
        f = rms(x, sd[pre + "ffn_norm.weight"])
        f = plora(F.silu(plora(f, pre + "feed_forward.w1", "w1")) * plora(f, pre + "feed_forward.w3", "w3"),
                  pre + "feed_forward.w2", "w2")
        x = x + f
    return rms(x, sd["norm.weight"]) @ sd["output.weight"].T


@pytest.mark.parametrize("where", ["some", "none", "all"])
@pytest.mark.parametrize("lora", ["mixed", "uniform"])
@torch.no_grad()
def test_plora_matches_boolean_indexing_reference(where, lora):
    kv_heads = 1 if lora == "uniform" else 2  # [q x 4 | k | v] per group as in the 7B, and [q x 2 | k | v]
    cfg = InternLM2Config(**{**TINY, "kv_heads": kv_heads}, lora=MIXED_LORA if lora == "mixed" else lora_table((8, 8)))
    m = ours(cfg, seed=4)
    torch.manual_seed(5)
    B, L = 2, 8
    emb = m["embed"](torch.randint(0, cfg.vocab_size, (B, L)))
    im = torch.zeros(B, L, dtype=torch.bool)
    if where == "some":
        im[0, 1:5], im[1, 0:3], im[1, 6] = True, True, True
    elif where == "all":
        im[:] = True
    state = dict(m.state_dict())
    ref = plora_reference(cfg, {k: v for k, v in state.items() if not k.startswith("embed.")}, emb, im)
    pos = torch.arange(L).expand(B, L).contiguous()
    got, _ = m["group"](emb, pos, *empty_cache(cfg, B)[:1], im.float(), empty_cache(cfg, B)[1])
    close(got, ref, f"PLoRA logits, mask on {where}", ATOL)
    if where != "none":  # the mask matters (the test would pass vacuously otherwise)
        base, _ = m["group"](emb, pos, *empty_cache(cfg, B)[:1], torch.zeros(B, L), empty_cache(cfg, B)[1])
        assert (base - ref).abs().max() > 1e-2


@torch.no_grad()
def test_config_bias_on_wqkv_and_wo_matches_reference():
    cfg = InternLM2Config(**TINY, lora=MIXED_LORA, bias=True)
    m = ours(cfg, seed=10)
    names = {n for n, _ in m.named_parameters() if n.endswith(".bias")}
    assert names == {f"group.layers.{i}.attention.{w}.bias" for i in range(cfg.layers) for w in ("wqkv", "wo")}
    B, L = 2, 5
    emb = m["embed"](torch.randint(0, cfg.vocab_size, (B, L)))
    im = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    ref = plora_reference(cfg, {k: v for k, v in m.state_dict().items() if not k.startswith("embed.")}, emb, im)
    got, _ = m["group"](emb, torch.arange(L).expand(B, L), *empty_cache(cfg, B)[:1], im.float(), empty_cache(cfg, B)[1])
    close(got, ref, "logits with wqkv/wo biases", ATOL)


@torch.no_grad()
def test_plora_prefill_then_text_decode_matches_reference():
    """Image positions in the prompt, then decode steps with im_mask 0 (as the original zeroes it
    when it embeds ids), each against the reference's full recompute of the whole sequence."""
    cfg = InternLM2Config(**TINY, lora=MIXED_LORA)
    m = ours(cfg, seed=6)
    torch.manual_seed(7)
    B, n, steps, cap = 1, 6, 3, 12
    ids = torch.randint(0, cfg.vocab_size, (B, n + steps))
    emb = m["embed"](ids)
    im = torch.zeros(B, n + steps, dtype=torch.bool)
    im[:, 1:4] = True
    pos = torch.arange(n + steps)[None]
    _, present = m["group"](emb[:, :n], pos[:, :n], *empty_cache(cfg, B)[:1], im[:, :n].float(), empty_cache(cfg, B)[1])
    past = torch.zeros(cfg.layers, 2, B, cfg.kv_heads, cap, cfg.head_dim)
    mask = torch.zeros(B, cap)
    past[..., :n, :], mask[:, :n] = present, 1.0
    for t in range(n, n + steps):
        got, kv = m["group"](emb[:, t:t + 1], pos[:, t:t + 1], mask, torch.zeros(B, 1), past)
        ref = plora_reference(cfg, {k: v for k, v in m.state_dict().items() if not k.startswith("embed.")},
                              emb[:, :t + 1], im[:, :t + 1])
        close(got, ref[:, -1:], f"decode at {t}", ATOL)
        past[..., t:t + 1, :], mask[:, t] = kv, 1.0


# ------------------------------------------------------------------ config, RoPE, fp16

def test_config_and_rope_scaling():
    real = InternLM2Config()
    assert (real.head_dim, real.q_per_kv, real.lora_of("wqkv"), real.lora_of("w2")) == (128, 4, (256, 256), (256, 256))
    assert InternLM2Config(lora=lora_table(wqkv=(8, 16))).lora_of("wqkv") == (8, 16)
    with pytest.raises(ValueError):
        lora_table(wq=(8, 16))
    with pytest.raises(ValueError):
        InternLM2Config(rope_scaling="yarn")
    with pytest.raises(ValueError):
        InternLM2Config(heads=32, kv_heads=5)
    plain = InternLM2Config(**TINY)
    dyn = InternLM2Config(**TINY, rope_scaling="dynamic", rope_factor=2.0)
    for a, b in zip(rope_table(plain, 64), rope_table(dyn, 64)):
        assert torch.equal(a, b)  # dynamic NTK is the plain table up to max_positions
    with pytest.raises(ValueError, match="dynamic"):
        InternLM2DecoderGroup(dyn, 0, 1, rope_length=65)
    lin = InternLM2Config(**TINY, rope_scaling="linear", rope_factor=2.0)
    assert torch.allclose(rope_table(lin, 64)[0][10], rope_table(plain, 64)[0][5], atol=1e-6)


@torch.no_grad()
def test_fp16_group_runs_close_to_fp32():
    cfg = InternLM2Config(**TINY, lora=MIXED_LORA)
    m = ours(cfg, seed=8)
    B, S = 1, 6
    emb = m["embed"](torch.randint(0, cfg.vocab_size, (B, S)))
    pos, im = torch.arange(S)[None], torch.tensor([[0, 1, 1, 1, 0, 0]]).float()
    ref, _ = m["group"](emb, pos, *empty_cache(cfg, B)[:1], im, empty_cache(cfg, B)[1])
    half = cast_module(m["group"], torch.float16)
    got, kv = half(emb.half(), pos, torch.zeros(B, 0).half(), im.half(), empty_cache(cfg, B)[1].half())
    assert got.dtype == torch.float32 and kv.dtype == torch.float16
    assert torch.isfinite(got).all() and (got - ref).abs().max() < 2e-2 * ref.abs().max()


# ------------------------------------------------------------------ ONNX

def decoder_subgraph(cfg: InternLM2Config, group: InternLM2DecoderGroup) -> Subgraph:
    n, per_layer = len(group.layers), group.kv_layout == "per_layer"
    kv_dims = ("batch", cfg.kv_heads, "cache", cfg.head_dim)
    new_dims = ("batch", cfg.kv_heads, "seq", cfg.head_dim)
    kv = [f"{kind}_{i}" for i in range(n) for kind in ("key", "value")]
    past = [TensorDecl(f"past_{k}", "float32", kv_dims) for k in kv] if per_layer else \
        [TensorDecl("past_kv", "float32", (n, 2, *kv_dims))]
    present = [TensorDecl(f"present_{k}", "float32", new_dims) for k in kv] if per_layer else \
        [TensorDecl("present_kv", "float32", (n, 2, *new_dims))]
    inputs = [TensorDecl("hidden_states", "float32", ("batch", "seq", cfg.hidden)),
              TensorDecl("position_ids", "int64", ("batch", "seq")),
              TensorDecl("attention_mask", "float32", ("batch", "cache")),
              TensorDecl("im_mask", "float32", ("batch", "seq")),
              *past, TensorDecl("logits_index", "int64", ("batch",))]
    outputs = [TensorDecl("logits", "float32", ("batch", cfg.vocab_size)), *present]

    def make_inputs(g, gen):
        b, s, c = g["batch"], g["seq"], g["cache"]
        feeds = {"hidden_states": torch.randn(b, s, cfg.hidden, generator=gen),
                 "position_ids": torch.randint(0, cfg.max_positions, (b, s), generator=gen),
                 "attention_mask": (torch.rand(b, c, generator=gen) > 0.3).float(),
                 "im_mask": (torch.rand(b, s, generator=gen) > 0.5).float(),
                 "logits_index": torch.randint(0, s, (b,), generator=gen)}
        for d in past:
            feeds[d.name] = torch.randn(*d.shape(g), generator=gen)
        return feeds

    return Subgraph(name="decoder", build=lambda: group, inputs=inputs, outputs=outputs, make_inputs=make_inputs,
                    gears=[{"batch": 1, "seq": 1, "cache": 8}, {"batch": 2, "seq": 5, "cache": 12}])


@pytest.mark.parametrize("kv_layout", ["stacked", "per_layer"])
@torch.no_grad()
def test_onnx_opset13_lint_clean_matches_torch(tmp_path, kv_layout):
    cfg = InternLM2Config(**TINY, lora=MIXED_LORA)
    group = InternLM2DecoderGroup(cfg, 0, cfg.layers, kv_layout=kv_layout)
    randomize(group, 9)
    sg = decoder_subgraph(cfg, group)
    check_onnx_group(sg, group, tmp_path)
