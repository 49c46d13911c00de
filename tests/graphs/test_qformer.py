"""graphs/qformer.py vs transformers' ``Blip2QFormerModel``: cross-attention on every other
layer as MiniGPT-4 has it, and every layer's output.

The oracle is an independent implementation with the SAME weights: our random (seeded) weights
are copied into transformers' module through an explicit name map (our checkpoint names -> HF
names, ``tests.helpers.hf_weights.load_mapped``). Tiny sizes, float32, eval(), eager attention.
"""
from __future__ import annotations

import torch
import transformers as T

from tests.helpers.hf_weights import close, load_mapped, randomize
from vlm2om.graphs.qformer import QFormer, QFormerConfig


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
