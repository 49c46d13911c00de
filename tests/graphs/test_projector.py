"""graphs/projector.py: LLaVA-1.5's mlp2x_gelu projector and the whole image path (tower then
projector) vs transformers' ``LlavaModel`` with the same weights, loaded by name:
our names are transformers' names minus ``vision_model.`` (resp. ``vision_tower.vision_model.`` /
``multi_modal_projector.``), so the prefix strip (``tests.helpers.hf_weights.load_by_prefix``) is
the check that they mirror.
"""
from __future__ import annotations

import torch
import transformers as T

from tests.helpers.hf_weights import CLIP_TINY as TINY
from tests.helpers.hf_weights import hf_clip_config, jitter_, load_by_prefix, max_diff
from vlm2om.graphs.clip_vit import ClipVisionConfig, ClipVisionTower
from vlm2om.graphs.projector import Bridge, MlpGeluProjector, MlpGeluProjectorConfig


@torch.no_grad()
def test_mlp2x_gelu_and_bridge_match_hf_llava():
    vision = hf_clip_config()
    text = T.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4)
    cfg = T.LlavaConfig(vision_config=vision, text_config=text, projector_hidden_act="gelu",
                        vision_feature_layer=-2, vision_feature_select_strategy="default")
    hf = jitter_(T.LlavaModel(cfg), seed=4)

    proj = MlpGeluProjector(MlpGeluProjectorConfig(in_dim=TINY["width"], out_dim=48)).eval()
    unused = load_by_prefix(proj, hf.state_dict(), {"multi_modal_projector.": ""})
    assert not any(k.startswith("multi_modal_projector.") for k in unused)
    feats = torch.randn(2, 16, TINY["width"], generator=torch.Generator().manual_seed(5))
    d_proj = max_diff(proj(feats), hf.multi_modal_projector(feats))
    assert d_proj < 1e-5, d_proj

    # The whole image path: pixels -> tower (hidden_states[-2] minus CLS) -> projector.
    bridge = Bridge(ClipVisionTower(ClipVisionConfig(**TINY)), proj).eval()
    load_by_prefix(bridge, hf.state_dict(), {"vision_tower.": "encoder.",
                                             "multi_modal_projector.": "projector."})
    pixels = torch.randn(2, 3, TINY["image_size"], TINY["image_size"], generator=torch.Generator().manual_seed(6))
    ref = torch.stack(list(hf.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                                 vision_feature_select_strategy="default").pooler_output))
    d_all = max_diff(bridge(pixels), ref)
    assert d_all < 1e-5, d_all


