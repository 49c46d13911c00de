"""graphs/clip_vit.py (LLaVA-1.5's CLIP tower) vs transformers' ``CLIPVisionModel`` with the same
weights, loaded by name: our names are transformers' names minus ``vision_model.`` (resp. ``vision_tower.vision_model.`` /
``multi_modal_projector.``), so the prefix strip (``tests.helpers.hf_weights.load_by_prefix``) is
the check that they mirror.
"""
from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
import transformers as T

from tests.helpers.hf_weights import CLIP_TINY as TINY
from tests.helpers.hf_weights import hf_clip_config, jitter_, load_by_prefix, max_diff
from vlm2om.exporters.core.onnx_export import export_onnx
from vlm2om.exporters.core.subgraph import Subgraph, TensorDecl
from vlm2om.graphs.clip_vit import ClipVisionConfig, ClipVisionTower


def test_clip_config_real_size():
    cfg = ClipVisionConfig()
    assert (cfg.built_layers, cfg.num_tokens, cfg.num_positions) == (23, 576, 577)
    tower = ClipVisionTower(ClipVisionConfig(**{**TINY, "layers": 24}))
    assert len(tower.encoder.layers) == 23
    with pytest.raises(ValueError):
        ClipVisionConfig(select_layer=-26)


@pytest.mark.parametrize("select_layer", [-2, -1, 1])
@torch.no_grad()
def test_clip_tower_matches_hf_hidden_states(select_layer):
    cfg = ClipVisionConfig(**TINY, select_layer=select_layer)
    hf = jitter_(T.CLIPVisionModel(hf_clip_config()), seed=1)
    ours = ClipVisionTower(cfg).eval()
    unused = load_by_prefix(ours, hf.state_dict(), {"": ""})
    expected = {k for k in hf.state_dict() if k.replace("vision_model.", "", 1).startswith(
        ClipVisionTower.unused_checkpoint_keys(cfg))}
    assert unused == expected and any("post_layernorm" in k for k in unused)
    assert len(ours.encoder.layers) == cfg.built_layers

    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(2))
    ref = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[select_layer][:, 1:]
    diff = max_diff(ours(pixels), ref)
    assert diff < 1e-5, diff


@torch.no_grad()
def test_clip_tower_onnx_matches_torch(tmp_path):
    cfg = ClipVisionConfig(**TINY)
    tower = jitter_(ClipVisionTower(cfg), seed=3)
    sg = Subgraph(
        name="vision", build=lambda: tower,
        inputs=[TensorDecl("pixel_values", "float32", ("batch", 3, cfg.image_size, cfg.image_size))],
        outputs=[TensorDecl("image_features", "float32", ("batch", cfg.num_tokens, cfg.width))],
        make_inputs=lambda g, gen: {"pixel_values": torch.randn(g["batch"], 3, cfg.image_size,
                                                                cfg.image_size, generator=gen)},
        gears=[{"batch": 1}, {"batch": 2}])
    path = export_onnx(sg, tower, tmp_path)[0]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 2):
        x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(batch))
        got = sess.run(None, {"pixel_values": x.numpy()})[0]
        diff = max_diff(torch.from_numpy(got), tower(x))
        assert diff < 1e-5, (batch, diff)


