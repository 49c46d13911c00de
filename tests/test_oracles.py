"""Oracle tests: our export-friendly graphs/ modules vs transformers' own implementations.

The oracle is an independent implementation with the SAME weights: our random (seeded) weights
are copied into ``LlamaForCausalLM`` / ``Blip2VisionModel`` / ``Blip2QFormerModel`` through an
explicit name map (our LAVIS/MiniGPT-4 checkpoint names -> HF names). Every HF parameter is
NaN-filled first, and the map must use every parameter on both sides exactly once, so no
weight can be skipped silently. Tiny sizes, float32, eval(), eager attention.
"""
from __future__ import annotations

import pytest
import torch
import transformers as T
from torch import nn
from torch.nn import functional as F

from vlm2om.graphs.common import init_random_
from vlm2om.graphs.eva_vit import EvaVisionEncoder, EvaVitConfig
from vlm2om.graphs.llama import LlamaConfig, LlamaDecoderGroup, LlamaEmbedding
from vlm2om.graphs.qformer import QFormer, QFormerConfig

ATOL = 1e-4


def randomize(module: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """init_random_, then jitter the norms too (init_random_ leaves them at 1/0, which would hide
    a swapped norm in the name map)."""
    init_random_(module, seed, std)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name.lower() or "ln_" in name.lower() or "LayerNorm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return module.eval()


def load_mapped(ours: nn.Module, hf: nn.Module, pairs) -> None:
    """pairs: (our_name | None, hf_name | None, slice | None). our None = zeros (EVA k-bias);
    hf None = our parameter is fed to HF as an input instead (Q-Former query tokens)."""
    src, dst = dict(ours.named_parameters()), dict(hf.named_parameters())
    used_src = [o for o, _, _ in pairs if o is not None]
    used_dst = {h for _, h, _ in pairs if h is not None}
    assert len(used_src) == len(set(used_src)), "an our-side parameter is mapped twice"
    assert set(used_src) == set(src), f"unmapped ours: {set(src) - set(used_src)}, " \
                                      f"unknown: {set(used_src) - set(src)}"
    assert used_dst == set(dst), f"unmapped HF: {set(dst) - used_dst}, unknown: {used_dst - set(dst)}"
    with torch.no_grad():
        for p in dst.values():
            p.fill_(float("nan"))
        for o, h, sl in pairs:
            if h is None:
                continue
            target = dst[h] if sl is None else dst[h][sl]
            value = torch.zeros_like(target) if o is None else src[o]
            assert value.shape == target.shape, f"{o} {tuple(value.shape)} -> {h} {tuple(target.shape)}"
            target.copy_(value)
    left = [n for n, p in dst.items() if torch.isnan(p).any()]
    assert not left, f"HF parameters (partly) not written: {left}"
    hf.eval()


def close(ours: torch.Tensor, ref: torch.Tensor, what: str, atol: float = ATOL) -> float:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    diff = (ours - ref).abs().max().item()
    assert diff <= atol, f"{what}: max abs diff {diff:.3e} > {atol:.0e}"
    return diff


# ------------------------------------------------------------------------------------- Llama
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


# ------------------------------------------------------------------------------- EVA-ViT
@torch.no_grad()
def test_eva_vit_matches_hf_blip2_vision():
    cfg = EvaVitConfig(image_size=28, patch_size=7, width=48, depth=3, heads=4, mlp_dim=80)
    ours = randomize(EvaVisionEncoder(cfg), seed=11, std=0.1)
    hf = T.Blip2VisionModel(T.Blip2VisionConfig(
        hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        layer_norm_eps=cfg.eps, qkv_bias=True, hidden_act="gelu", attn_implementation="eager"))
    W = cfg.width
    pairs = [("cls_token", "embeddings.class_embedding", None),
             ("pos_embed", "embeddings.position_embedding", None),
             ("patch_embed.proj.weight", "embeddings.patch_embedding.weight", None),
             ("patch_embed.proj.bias", "embeddings.patch_embedding.bias", None),
             # ln_vision has no HF counterpart in the encoder; post_layernorm sits at its place
             # (different eps) and is checked below against an explicit layer_norm.
             ("ln_vision.weight", "post_layernorm.weight", None),
             ("ln_vision.bias", "post_layernorm.bias", None)]
    for i in range(cfg.depth):
        o, h = f"blocks.{i}.", f"encoder.layers.{i}."
        pairs += [(o + "attn.q_bias", h + "self_attn.qkv.bias", slice(0, W)),
                  (None, h + "self_attn.qkv.bias", slice(W, 2 * W)),  # EVA has no k bias
                  (o + "attn.v_bias", h + "self_attn.qkv.bias", slice(2 * W, 3 * W))]
        pairs += [(o + a + "." + leaf, h + b + "." + leaf, None) for leaf in ("weight", "bias")
                  for a, b in [("norm1", "layer_norm1"), ("norm2", "layer_norm2"),
                               ("attn.proj", "self_attn.projection"),
                               ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]]
        pairs.append((o + "attn.qkv.weight", h + "self_attn.qkv.weight", None))
    load_mapped(ours, hf, pairs)

    torch.manual_seed(12)
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    ref = hf(pixel_values=pixels, output_hidden_states=True)
    assert len(ref.hidden_states) == cfg.depth + 1  # embeddings, then every block's output
    pre = ref.hidden_states[-1]
    # hidden_states[-1] is the encoder output BEFORE post_layernorm (tie_last_hidden_states=False).
    post = F.layer_norm(pre, (W,), hf.post_layernorm.weight, hf.post_layernorm.bias, cfg.eps)
    close(post, ref.last_hidden_state, "HF hidden_states[-1] is pre-post_layernorm", atol=1e-6)

    seen = []
    hooks = [b.register_forward_hook(lambda m, i, out: seen.append(out)) for b in ours.blocks]
    trunk = ours.trunk(pixels)
    for hk in hooks:
        hk.remove()
    for i, h in enumerate(seen):
        close(h, ref.hidden_states[i + 1], f"EVA block {i} output")
    close(trunk, pre, "EVA trunk vs HF encoder output")
    ln = F.layer_norm(pre, (W,), ours.ln_vision.weight, ours.ln_vision.bias, 1e-5)
    close(ours(pixels), ln, "EVA forward == ln_vision(eps 1e-5) of the HF trunk")
    assert ours.ln_vision.eps == 1e-5 and all(b.norm1.eps == 1e-6 for b in ours.blocks)


# ------------------------------------------------------------------------------ Q-Former
@torch.no_grad()
def test_qformer_matches_hf_blip2_qformer():
    cfg = QFormerConfig(hidden=32, layers=6, heads=4, ffn=64, encoder_width=48, num_query=8)
    ours = randomize(QFormer(cfg), seed=21, std=0.1)
    hf = T.Blip2QFormerModel(T.Blip2QFormerConfig(
        hidden_size=cfg.hidden, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        intermediate_size=cfg.ffn, encoder_hidden_size=cfg.encoder_width,
        cross_attention_frequency=cfg.cross_every, layer_norm_eps=cfg.eps, hidden_act="gelu",
        use_qformer_text_input=False, attn_implementation="eager"))
    # Cross-attention exactly on layers 0, 2, 4 (MiniGPT-4: layer_num % cross_attention_freq == 0).
    expected = list(range(0, cfg.layers, 2))
    assert [i for i, l in enumerate(ours.layer) if hasattr(l, "crossattention")] == expected
    assert [i for i, l in enumerate(hf.encoder.layer) if l.has_cross_attention] == expected
    assert [i for i in range(cfg.layers) if cfg.has_cross(i)] == expected

    pairs = [("query_tokens", None, None),  # fed as query_embeds, as in Blip2Model
             ("embeddings_LayerNorm.weight", "layernorm.weight", None),
             ("embeddings_LayerNorm.bias", "layernorm.bias", None)]
    for i in range(cfg.layers):
        subs = [("attention.self.query", "attention.attention.query"),
                ("attention.self.key", "attention.attention.key"),
                ("attention.self.value", "attention.attention.value"),
                ("attention.output.dense", "attention.output.dense"),
                ("attention.output.LayerNorm", "attention.output.LayerNorm"),
                ("intermediate_query.dense", "intermediate_query.dense"),
                ("output_query.dense", "output_query.dense"),
                ("output_query.LayerNorm", "output_query.LayerNorm")]
        if i in expected:
            subs += [(a.replace("attention.", "crossattention.", 1),
                      b.replace("attention.", "crossattention.", 1)) for a, b in subs[:5]]
        pairs += [(f"layer.{i}.{a}.{leaf}", f"encoder.layer.{i}.{b}.{leaf}", None)
                  for a, b in subs for leaf in ("weight", "bias")]
    load_mapped(ours, hf, pairs)

    torch.manual_seed(22)
    image_embeds = torch.randn(2, 17, cfg.encoder_width)
    ref = hf(query_embeds=ours.query_tokens.expand(2, -1, -1), encoder_hidden_states=image_embeds,
             output_hidden_states=True)
    seen = []
    hooks = [l.register_forward_hook(lambda m, i, out: seen.append(out)) for l in ours.layer]
    out = ours(image_embeds)
    for hk in hooks:
        hk.remove()
    close(ours.embeddings_LayerNorm(ours.query_tokens.expand(2, -1, -1)), ref.hidden_states[0],
          "query tokens after embeddings.LayerNorm")
    for i, h in enumerate(seen):
        close(h, ref.hidden_states[i + 1], f"Q-Former layer {i} output")
    close(out, ref.last_hidden_state, "Q-Former last_hidden_state")
