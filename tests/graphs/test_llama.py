"""graphs/llama.py vs transformers' ``LlamaForCausalLM``: prefill, the KV cache it returns,
chained layer groups, and an incremental step over a cache with scattered valid slots.

The oracle is an independent implementation with the SAME weights: our random (seeded) weights
are copied into transformers' module through an explicit name map (our checkpoint names -> HF
names, ``tests.helpers.hf_weights.load_mapped``). Tiny sizes, float32, eval(), eager attention.
"""
from __future__ import annotations

import pytest
import torch
import transformers as T
from torch import nn

from tests.helpers.hf_weights import close, load_mapped, randomize
from vlm2om.graphs.llama import LlamaConfig, LlamaDecoderGroup, LlamaEmbedding


LLAMA_LEAVES = ["input_layernorm.weight", "post_attention_layernorm.weight",
                *(f"self_attn.{p}_proj.weight" for p in "qkvo"),
                *(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down"))]


def llama_pair(kv_heads: int, seed: int = 0):
    cfg = LlamaConfig(vocab_size=96, hidden=64, layers=3, heads=4, kv_heads=kv_heads, ffn=112,
                      rms_eps=1e-5, rope_theta=500.0, max_positions=64)
    ours = nn.ModuleDict({"embed": LlamaEmbedding(cfg), "group": LlamaDecoderGroup(cfg, 0, cfg.layers)})
    randomize(ours, seed)
    hf_cfg = T.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        intermediate_size=cfg.ffn, rms_norm_eps=cfg.rms_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        max_position_embeddings=cfg.max_positions, tie_word_embeddings=False,
        attn_implementation="eager")
    hf = T.LlamaForCausalLM(hf_cfg)
    assert hf.config._attn_implementation == "eager"
    pairs = [("embed.embed_tokens.weight", "model.embed_tokens.weight", None),
             ("group.norm.weight", "model.norm.weight", None),
             ("group.lm_head.weight", "lm_head.weight", None)]
    pairs += [(f"group.layers.{i}.{leaf}", f"model.layers.{i}.{leaf}", None)
              for i in range(cfg.layers) for leaf in LLAMA_LEAVES]
    load_mapped(ours, hf, pairs)
    return cfg, ours, hf


def subgroup(cfg, full: LlamaDecoderGroup, start: int, stop: int) -> LlamaDecoderGroup:
    """A group [start, stop) carrying the same weights as the corresponding layers of ``full``."""
    g = LlamaDecoderGroup(cfg, start, stop)
    for i, layer in enumerate(g.layers):
        layer.load_state_dict(full.layers[start + i].state_dict())
    if g.is_last:
        g.norm.load_state_dict(full.norm.state_dict())
        g.lm_head.load_state_dict(full.lm_head.state_dict())
    return g.eval()


def empty_cache(cfg, batch: int, cap: int = 0):
    return (torch.zeros(batch, cap),
            torch.zeros(cfg.layers, 2, batch, cfg.kv_heads, cap, cfg.head_dim))


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
@torch.no_grad()
def test_llama_prefill_matches_hf(kv_heads):
    cfg, ours, hf = llama_pair(kv_heads)
    torch.manual_seed(1)
    B, S = 2, 7
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    pos = torch.arange(S).expand(B, S).contiguous()
    ref = hf(input_ids=ids, use_cache=True, output_hidden_states=True)
    emb = ours["embed"](ids)
    close(emb, ref.hidden_states[0], "inputs_embeds")
    mask, past = empty_cache(cfg, B)
    logits, present = ours["group"](emb, pos, mask, past)
    close(logits, ref.logits, "logits")
    assert present.shape == (cfg.layers, 2, B, cfg.kv_heads, S, cfg.head_dim)
    for i, layer in enumerate(ref.past_key_values.layers):
        close(present[i, 0], layer.keys, f"layer {i} keys (after RoPE)")
        close(present[i, 1], layer.values, f"layer {i} values")
    # Per-layer hidden states: group [0, k) returns the residual stream after k layers, and
    # chaining [0, k) -> [k, L) must reproduce the single group exactly (the runtime's split).
    for k in range(1, cfg.layers):
        head = subgroup(cfg, ours["group"], 0, k)
        tail = subgroup(cfg, ours["group"], k, cfg.layers)
        h, pk = head(emb, pos, *empty_cache(cfg, B))
        close(h, ref.hidden_states[k], f"hidden after {k} layers")
        pre_tail = empty_cache(cfg, B)[1][: cfg.layers - k]
        chained, pk2 = tail(h, pos, torch.zeros(B, 0), pre_tail)
        close(chained, logits, f"groups [0,{k})+[{k},{cfg.layers}) vs one group", atol=1e-6)
        close(torch.cat([pk, pk2]), present, f"chained present_kv split at {k}", atol=1e-6)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa2"])
@torch.no_grad()
def test_llama_incremental_step_with_masked_cache(kv_heads):
    cfg, ours, hf = llama_pair(kv_heads, seed=3)
    torch.manual_seed(2)
    B, n, step, cap = 2, 5, 2, 9
    ids = torch.randint(0, cfg.vocab_size, (B, n + step))
    ref = hf(input_ids=ids, use_cache=True)
    emb = ours["embed"](ids)
    pos = torch.arange(n + step).expand(B, -1).contiguous()
    _, prefix_kv = ours["group"](emb[:, :n], pos[:, :n], *empty_cache(cfg, B))
    # Cache of capacity cap > n: valid tokens in scattered slots, large garbage everywhere else.
    past = torch.randn(cfg.layers, 2, B, cfg.kv_heads, cap, cfg.head_dim) * 50
    mask = torch.zeros(B, cap)
    for b in range(B):
        slots = torch.randperm(cap)[:n]
        past[:, :, b, :, slots] = prefix_kv[:, :, b]
        mask[b, slots] = 1.0
    logits, present = ours["group"](emb[:, n:], pos[:, n:], mask, past)
    close(logits, ref.logits[:, n:], "incremental logits vs HF full sequence")
    for i, layer in enumerate(ref.past_key_values.layers):
        close(present[i, 0], layer.keys[:, :, n:], f"step keys layer {i}")
        close(present[i, 1], layer.values[:, :, n:], f"step values layer {i}")
    # And a single-token decode step right after, with the step's KV written into the cache.
    free = [torch.nonzero(mask[b] == 0).flatten()[:step] for b in range(B)]
    for b in range(B):
        past[:, :, b, :, free[b]] = present[:, :, b]
        mask[b, free[b]] = 1.0
    nxt = torch.randint(0, cfg.vocab_size, (B, 1))
    ref2 = hf(input_ids=torch.cat([ids, nxt], 1))
    logits2, _ = ours["group"](ours["embed"](nxt), torch.full((B, 1), n + step), mask, past)
    close(logits2, ref2.logits[:, -1:], "decode-step logits")


