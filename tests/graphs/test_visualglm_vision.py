"""VisualGLM-6B's BLIP-2 image encoder (graphs/sat_vit.py, graphs/sat_qformer.py, and glm_proj as a
``LinearProjector``) vs SwissArmyTransformer's public ``ViTModel``/``BaseModel`` composed as
VisualGLM's ``blip2.py`` does (tests/helpers/sat_models.py), with the same random weights copied
through an explicit name table that uses every parameter on both sides once and needs no reshape.

Small sizes plus one layer at the real per-layer shapes; float32, eval(). The SAT tests skip where
SAT is not installed; the slicing, BERT-equivalence and ONNX tests always run.
"""
from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from tests.helpers.hf_weights import close, randomize
from tests.helpers.sat_models import (build_sat_qformer, build_sat_vit, copy_into_sat, qformer_pairs,
                                      vit_pairs)
from vlm2om.exporters.ascend.lint import errors, lint_graph
from vlm2om.exporters.core.onnx_export import export_onnx
from vlm2om.exporters.core.subgraph import Subgraph, TensorDecl
from vlm2om.graphs.eva_vit import EvaVitConfig
from vlm2om.graphs.projector import LinearProjector, LinearProjectorConfig
from vlm2om.graphs.qformer import QFormer, QFormerConfig
from vlm2om.graphs.sat_qformer import SatQFormer
from vlm2om.graphs.sat_vit import SatEvaVisionEncoder

VIT = EvaVitConfig(image_size=28, patch_size=14, width=64, depth=3, heads=4, mlp_dim=160)
QF = QFormerConfig(hidden=48, layers=3, heads=4, ffn=96, encoder_width=VIT.width, num_query=8)
PROJ = LinearProjectorConfig(in_dim=QF.hidden, out_dim=80)
# One layer at VisualGLM's real per-layer shapes (224 px, 257 tokens, 1408 wide; 768-wide Q-Former).
VIT_REAL = EvaVitConfig(depth=1)
QF_REAL = QFormerConfig(layers=1)
ATOL = 1e-5


def scaled(ref: torch.Tensor) -> float:
    """ATOL relative to the output's peak: fp32 rounding grows with it (1408/768-wide real layers)."""
    return ATOL * max(1.0, float(ref.abs().max()))


def pixels(cfg: EvaVitConfig, batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(seed))


def vit_with_sat(cfg: EvaVitConfig, seed: int):
    ours = randomize(SatEvaVisionEncoder(cfg), seed, std=0.1)
    sat = build_sat_vit(cfg)
    copy_into_sat(ours, sat, vit_pairs(cfg))
    return ours, sat


def qformer_with_sat(cfg: QFormerConfig, seed: int):
    ours = randomize(SatQFormer(cfg), seed, std=0.1)
    sat = build_sat_qformer(cfg)
    copy_into_sat(ours, sat, qformer_pairs(cfg))
    return ours, sat


@pytest.mark.parametrize("cfg", [VIT, VIT_REAL], ids=["small", "real-layer"])
@torch.no_grad()
def test_vit_and_ln_vision_match_sat(cfg):
    ours, sat = vit_with_sat(cfg, seed=1)
    layer = sat.transformer.layers[0]
    assert (layer.input_layernorm.eps, sat.mixins["cls"].ln_vision.eps) == (cfg.eps, cfg.ln_vision_eps)
    assert layer.attention.query_key_value.bias.shape == (3 * cfg.width,)  # the full bias, k part included
    x = pixels(cfg, 2, seed=2)
    ref = sat(x)[0]
    assert ref.shape == (2, cfg.num_tokens, cfg.width)
    close(ours(x), ref, f"ViT + ln_vision ({cfg.width} wide)", scaled(ref))


@pytest.mark.parametrize("cfg", [QF, QF_REAL], ids=["small", "real-layer"])
@torch.no_grad()
def test_qformer_matches_sat(cfg):
    ours, sat = qformer_with_sat(cfg, seed=3)
    crossing = [i for i, layer in enumerate(sat.transformer.layers) if layer.is_decoder]
    assert crossing == [i for i in range(cfg.layers) if i % 2 == 0]
    assert sat.transformer.final_layernorm.eps == cfg.eps
    feats = torch.randn(2, 17, cfg.encoder_width, generator=torch.Generator().manual_seed(4))
    ref = sat(feats)[0]
    assert ref.shape == (2, cfg.num_query, cfg.hidden)
    close(ours(feats), ref, f"Q-Former ({cfg.hidden} wide)", scaled(ref))


@torch.no_grad()
def test_blip2_chain_with_glm_proj_matches_sat():
    """BLIP2.forward: glm_proj(qformer(vit(image)[0])[0]), glm_proj a plain nn.Linear."""
    vit, sat_vit = vit_with_sat(VIT, seed=5)
    qf, sat_qf = qformer_with_sat(QF, seed=6)
    proj = randomize(LinearProjector(PROJ), seed=7, std=0.1)
    glm_proj = nn.Linear(PROJ.in_dim, PROJ.out_dim)
    glm_proj.load_state_dict({"weight": proj.proj.weight, "bias": proj.proj.bias})
    x = pixels(VIT, 2, seed=8)
    ref = glm_proj(sat_qf(sat_vit(x)[0])[0])
    close(proj(qf(vit(x))), ref, "image -> glm_proj tokens", ATOL)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def test_real_size_glm_proj_and_parameter_counts():
    """glm_proj at 768 -> 4096 against nn.Linear, and the parameter counts of the reference's static
    split, built a layer at a time (39 equal EVA layers; 6 Q-Former layers with cross-attention, 6 without)."""
    proj = randomize(LinearProjector(LinearProjectorConfig(768, 4096)), seed=9, std=0.1)
    x = torch.randn(2, 32, 768, generator=torch.Generator().manual_seed(10))
    close(proj(x), nn.functional.linear(x, proj.proj.weight, proj.proj.bias), "glm_proj 768->4096", ATOL)
    assert count(proj) == 3_149_824
    vit = SatEvaVisionEncoder(EvaVitConfig(depth=2), (0, 1))  # embeddings + one layer, no ln_vision
    layer = count(vit.layers[0])
    ln_vision = 2 * 1408
    assert count(vit) - layer + 39 * layer == 985_949_440
    assert count(SatEvaVisionEncoder(EvaVitConfig(depth=1))) == count(vit) + ln_vision
    qf = SatQFormer(QFormerConfig(layers=2))  # layer 0 crosses, layer 1 does not
    per_pair = count(qf.layers[0]) + count(qf.layers[1])
    assert count(qf) - per_pair + 6 * per_pair == 105_162_240


@torch.no_grad()
def test_layer_slices_chain_like_the_whole_vit():
    whole = randomize(SatEvaVisionEncoder(VIT), seed=11, std=0.1)
    x = pixels(VIT, 1, seed=12)
    want = whole(x)
    parts = [SatEvaVisionEncoder(VIT, (0, 1)), SatEvaVisionEncoder(VIT, (1, VIT.depth))]
    state = whole.state_dict()
    for part in parts:
        mine = {}
        for name in part.state_dict():
            if name.startswith("layers."):
                j, rest = name.split(".", 2)[1:]
                mine[name] = state[f"layers.{part.start + int(j)}.{rest}"]
            else:
                mine[name] = state[name]
        part.load_state_dict(mine)
    assert not hasattr(parts[1], "word_embeddings") and not hasattr(parts[0], "ln_vision")
    close(parts[1](parts[0](x)), want, "slices [0,1)+[1,3) vs whole", 1e-6)
    with pytest.raises(ValueError):
        SatEvaVisionEncoder(VIT, (2, 4))


@torch.no_grad()
def test_sat_qformer_is_the_bert_qformer_with_norms_shifted():
    """The claim in sat_qformer.py: fused projections split, LayerNorms moved one layer back,
    the SAT Q-Former is MiniGPT-4's BERT Q-Former (graphs/qformer.py)."""
    sat = randomize(SatQFormer(QF), seed=13, std=0.1)
    bert = QFormer(QF).eval()
    s, h = sat.state_dict(), QF.hidden
    want = {"query_tokens": s["word_embeddings.weight"][None]}
    norms = ["layers.0.input_layernorm"] + [f"layers.{i}.input_layernorm" for i in range(1, QF.layers)]
    outs = ["embeddings_LayerNorm"] + [f"layer.{i - 1}.output_query.LayerNorm" for i in range(1, QF.layers)]
    norms, outs = norms + ["final_layernorm"], outs + [f"layer.{QF.layers - 1}.output_query.LayerNorm"]
    for src, dst in zip(norms, outs):
        want.update({f"{dst}.{p}": s[f"{src}.{p}"] for p in ("weight", "bias")})
    for i in range(QF.layers):
        a, b = f"layers.{i}", f"layer.{i}"
        for p in ("weight", "bias"):
            q, k, v = s[f"{a}.attention.query_key_value.{p}"].split(h)
            want.update({f"{b}.attention.self.query.{p}": q, f"{b}.attention.self.key.{p}": k,
                         f"{b}.attention.self.value.{p}": v,
                         f"{b}.attention.output.dense.{p}": s[f"{a}.attention.dense.{p}"],
                         f"{b}.attention.output.LayerNorm.{p}": s[f"{a}.post_attention_layernorm.{p}"],
                         f"{b}.intermediate_query.dense.{p}": s[f"{a}.mlp.dense_h_to_4h.{p}"],
                         f"{b}.output_query.dense.{p}": s[f"{a}.mlp.dense_4h_to_h.{p}"]})
            if QF.has_cross(i):
                k, v = s[f"{a}.cross_attention.key_value.{p}"].split(h)
                want.update({f"{b}.crossattention.self.query.{p}": s[f"{a}.cross_attention.query.{p}"],
                             f"{b}.crossattention.self.key.{p}": k, f"{b}.crossattention.self.value.{p}": v,
                             f"{b}.crossattention.output.dense.{p}": s[f"{a}.cross_attention.dense.{p}"],
                             f"{b}.crossattention.output.LayerNorm.{p}":
                                 s[f"{a}.post_cross_attention_layernorm.{p}"]})
    bert.load_state_dict(want, strict=True)
    feats = torch.randn(2, 5, QF.encoder_width, generator=torch.Generator().manual_seed(14))
    close(sat(feats), bert(feats), "SAT Q-Former vs BERT Q-Former", 1e-6)


def image_subgraph(name: str, module: nn.Module, d_in: tuple, d_out: tuple) -> Subgraph:
    inp, out = TensorDecl("x", "float32", ("batch", *d_in)), TensorDecl("y", "float32", ("batch", *d_out))
    return Subgraph(name=name, build=lambda: module, inputs=[inp], outputs=[out],
                    make_inputs=lambda g, gen: {"x": torch.randn(g["batch"], *d_in, generator=gen)},
                    gears=[{"batch": 1}, {"batch": 2}])


def modules_for_onnx():
    return [
        ("vision", randomize(SatEvaVisionEncoder(VIT), 15, std=0.1), (3, VIT.image_size, VIT.image_size),
         (VIT.num_tokens, VIT.width)),
        ("qformer", randomize(SatQFormer(QF), 16, std=0.1), (VIT.num_tokens, QF.encoder_width),
         (QF.num_query, QF.hidden)),
        ("glm_proj", randomize(LinearProjector(PROJ), 17, std=0.1), (QF.num_query, PROJ.in_dim),
         (QF.num_query, PROJ.out_dim)),
    ]


@pytest.mark.parametrize("which", range(3), ids=["vision", "qformer", "glm_proj"])
@torch.no_grad()
def test_onnx_opset13_matches_torch(tmp_path, which):
    name, module, d_in, d_out = modules_for_onnx()[which]
    sg = image_subgraph(name, module, d_in, d_out)
    path = export_onnx(sg, module, tmp_path)[0]
    model = onnx.load(str(path))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [13]
    assert not errors(lint_graph(path, name)), errors(lint_graph(path, name))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for gear in sg.gears:
        x = sg.make_inputs(gear, torch.Generator().manual_seed(gear["batch"]))["x"]
        (got,) = sess.run(None, {"x": x.numpy()})
        close(torch.from_numpy(got), module(x), f"{name} onnxruntime vs torch at {gear}", ATOL)
