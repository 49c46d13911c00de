"""graphs/eva_vit.py vs transformers' ``Blip2VisionModel`` (MiniGPT-4's EVA-CLIP ViT-g), and
the encoder exported as block slices chaining to the whole.

The oracle is an independent implementation with the SAME weights: our random (seeded) weights
are copied into transformers' module through an explicit name map (our checkpoint names -> HF
names, ``tests.helpers.hf_weights.load_mapped``). Tiny sizes, float32, eval(), eager attention.
"""
from __future__ import annotations

import torch
import transformers as T
from torch.nn import functional as F

from tests.helpers.hf_weights import close, load_mapped, randomize
from vlm2om.graphs.common import init_random_
from vlm2om.graphs.eva_vit import EvaVisionEncoder, EvaVitConfig


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


def test_eva_block_slices_chain_to_the_whole_encoder():
    """A ViT exported as several smaller graphs computes what the whole encoder computes."""
    cfg = EvaVitConfig(width=32, depth=4, heads=2, mlp_dim=64)
    whole = init_random_(EvaVisionEncoder(cfg), 1).eval()
    full = whole.state_dict()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    y = x
    for a, b in [(0, 1), (1, 3), (3, 4)]:
        part = EvaVisionEncoder(cfg, (a, b)).eval()
        local = {}
        for key in part.state_dict():
            if key.startswith("blocks."):
                _, j, rest = key.split(".", 2)
                key_full = f"blocks.{int(j) + a}.{rest}"
            else:
                key_full = key
            local[key] = full[key_full]
        part.load_state_dict(local, strict=True)
        with torch.no_grad():
            y = part(y)
    with torch.no_grad():
        torch.testing.assert_close(y, whole(x), rtol=1e-5, atol=1e-5)
