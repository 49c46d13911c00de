"""InternLM-XComposer2's image side: the VL tower (CLIP at 490 px, all layers, no post_layernorm)
against transformers' own CLIPVisionModel, and the 4KHD per-view merge against the original's
rules written out here (2x2 merge channel order, separators, a token-wise vision_proj)."""
from __future__ import annotations

import pytest
import torch
import transformers as T
from torch.nn import functional as F

from vlm2om.graphs.clip_vit import ClipVisionConfig, ClipVisionTower
from vlm2om.graphs.common import init_random_
from vlm2om.graphs.ixc2_vision import HdViewConfig, HdViewProjector


@torch.no_grad()
def test_vl_tower_is_clip_last_layer_before_post_layernorm_without_cls():
    cfg = ClipVisionConfig(image_size=70, patch_size=14, width=32, layers=2, heads=4, mlp_dim=64, select_layer=-1)
    hf = T.CLIPVisionModel(T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, image_size=70, patch_size=14,
                                              hidden_act="quick_gelu")).eval()
    init_random_(hf, 1, 0.1)
    ours = ClipVisionTower(cfg).eval()
    state = {k.removeprefix("vision_model."): v for k, v in hf.state_dict().items()}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert missing == [] and all(k.startswith(("post_layernorm.", "embeddings.position_ids")) for k in unexpected)
    x = torch.randn(2, 3, 70, 70)
    out = hf(pixel_values=x, output_hidden_states=True)
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    torch.testing.assert_close(ours(x), out.last_hidden_state[:, 1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grid", [4, 24])
@torch.no_grad()
def test_view_projector_follows_the_original_merge(grid):
    cfg = HdViewConfig(grid=grid, width=8, hidden=16)
    m = init_random_(HdViewProjector(cfg), 2, 0.3).eval()
    x = torch.randn(3, grid * grid, 8)
    g = grid // 2
    # The original: [B, N, C] -> [B, H, H, C] -> reshape(B, H/2, 2, H/2, 2, C).permute(0,1,3,2,4,5) -> 4C.
    merged = x.reshape(3, grid, grid, 8).reshape(3, g, 2, g, 2, 8).permute(0, 1, 3, 2, 4, 5).reshape(3, g * g, 32)
    # The channel blocks of one merged token are the 2x2 cell's patches (0,0), (0,1), (1,0), (1,1).
    assert torch.equal(merged[0, 0, 8:16], x[0, 1]) and torch.equal(merged[0, 0, 16:24], x[0, grid])
    p = m.proj

    def proj(t):
        return p.linear_2(F.gelu(p.linear_1(t)))

    out = m(x)
    assert out.shape == (3, g * g + 2, 16)
    torch.testing.assert_close(out[:, :g * g], proj(merged), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[:, g * g], proj(m.glb_GN.reshape(1, 32)).expand(3, 16), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[:, g * g + 1], proj(m.sub_GN.reshape(1, 32)).expand(3, 16), rtol=1e-5, atol=1e-6)
