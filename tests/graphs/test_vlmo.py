"""graphs/vlmo.py against a reference written here from the original code's facts
(model-architectures.md section 5: ``multiway_transformer.py``, ``vlmo_module.py``, ``heads.py``),
on a state dict with the original key names and none of the graph code:

* the relative position index built pair by pair as ``build_relative_position_embed`` defines it
  (BEiT's 2-D offsets, the text offsets from ``max_text_len_of_initckpt``, the CLS entries, the
  text->image and image->text constants), the bias ``F.embedding(index, table).permute(2, 0, 1)``
  chunked by layer;
* attention with ``cat(q_bias, 0, v_bias)``, float32 logits, ``masked_fill(-inf)`` on padding;
* the blocks' experts: split at ``max_text_len`` below ``vlffn_start_layer_index``, the VL expert
  from it on; text-only and image-only for retrieval;
* BERT embeddings without positions, the token types 0/1, the pooler, the VQA head, the ITC heads.

Then the VQA graph through ONNX (opset 13, lint clean for ATC, the gather in the graph).
"""
from __future__ import annotations

import math

import onnx
import onnxruntime as ort
import pytest
import torch
from torch.nn import functional as F

from vlm2om.exporters.ascend.lint import errors, lint_graph
from vlm2om.exporters.core.onnx_export import export_onnx
from vlm2om.exporters.core.subgraph import Subgraph, TensorDecl
from vlm2om.graphs.vlmo import VlmoConfig, VlmoEncoder

# grid 3 (10 image tokens), text 6, the VL expert from layer 2 of 3, a text table of 2 x 8.
TINY = VlmoConfig(image_size=48, patch_size=16, width=16, layers=3, heads=2, mlp_ratio=2, vlffn_start=2,
                  max_text_len=6, text_rel_len=8, vocab_size=50, vqa_labels=7)


def random_state(cfg: VlmoConfig, modality: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors for a modality's graph, from our module's names (the original's) but
    random values: norms around 1, gammas around the layer scale, the rest N(0, 0.3)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in VlmoEncoder(cfg, modality).named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        out[name] = 1 + 0.1 * noise if ("norm" in name or "LayerNorm" in name) and name.endswith("weight") else \
            cfg.layer_scale * (1 + 0.1 * noise) if "gamma" in name else 0.3 * noise
    return out


def reference_index(cfg: VlmoConfig, modality: str) -> torch.Tensor:
    g, t = cfg.grid, cfg.max_text_len
    n_rel = (2 * g - 1) ** 2 + 3
    all_rel = n_rel + 2 * cfg.text_rel_len + 2
    img = torch.zeros(g * g + 1, g * g + 1, dtype=torch.long)
    for p in range(g * g):
        for q in range(g * g):
            (yp, xp), (yq, xq) = divmod(p, g), divmod(q, g)
            img[p + 1, q + 1] = (yp - yq + g - 1) * (2 * g - 1) + (xp - xq + g - 1)
    img[0, :], img[:, 0], img[0, 0] = n_rel - 3, n_rel - 2, n_rel - 1
    txt = torch.zeros(t, t, dtype=torch.long)
    for i in range(1, t):
        for j in range(1, t):
            txt[i, j] = (j - i) - (2 - cfg.text_rel_len) + n_rel + 2
    txt[0, :], txt[:, 0], txt[0, 0] = all_rel - 3, all_rel - 2, all_rel - 1
    if modality == "image":
        return img
    if modality == "text":
        return txt
    i = g * g + 1
    return torch.cat([torch.cat([txt, torch.full((t, i), n_rel)], 1), torch.cat([torch.full((i, t), n_rel + 1), img], 1)])


def reference(sd: dict, cfg: VlmoConfig, modality: str, pixels=None, ids=None, mask=None) -> torch.Tensor:
    w, h = cfg.width, cfg.heads

    def ln(x, name, eps):
        return F.layer_norm(x, (x.shape[-1],), sd[f"{name}.weight"], sd[f"{name}.bias"], eps)

    def lin(x, name, bias=True):
        return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"] if bias else None)

    def mlp(x, name):
        return lin(F.gelu(lin(x, f"{name}.fc1")), f"{name}.fc2")

    parts, masks = [], []
    if modality != "image":
        e = sd["text_embeddings.word_embeddings.weight"][ids] + sd["text_embeddings.token_type_embeddings.weight"][0]
        e = ln(e, "text_embeddings.LayerNorm", cfg.bert_eps)  # position_embedding_type rel_pos: no positions
        parts.append(e + sd["token_type_embeddings.weight"][0])
        masks.append(mask)
    if modality != "text":
        x = F.conv2d(pixels, sd["transformer.patch_embed.proj.weight"], sd["transformer.patch_embed.proj.bias"],
                     stride=cfg.patch_size).flatten(2).transpose(1, 2)
        x = torch.cat([sd["transformer.cls_token"].expand(x.shape[0], -1, -1), x], 1)
        parts.append(x + sd["token_type_embeddings.weight"][1])
        masks.append(torch.ones(x.shape[0], x.shape[1], dtype=torch.long))
    x, m = torch.cat(parts, 1), torch.cat(masks, 1).bool()
    bias = F.embedding(reference_index(cfg, modality), sd["relative_position_bias_table"]).permute(2, 0, 1)
    biases = torch.chunk(bias, cfg.layers, dim=0)
    b, n = x.shape[:2]
    for i in range(cfg.layers):
        p = f"transformer.blocks.{i}."
        y = ln(x, p + "norm1", cfg.eps)
        qkv_bias = torch.cat([sd[p + "attn.q_bias"], torch.zeros(w), sd[p + "attn.v_bias"]])
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], qkv_bias).reshape(b, n, 3, h, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (w // h) ** -0.5, qkv[1], qkv[2]
        attn = q.float() @ k.float().transpose(-2, -1) + biases[i][None]
        attn = attn.masked_fill(~m[:, None, None, :], float("-inf")).softmax(-1)
        x = x + sd[p + "gamma_1"] * lin((attn @ v).transpose(1, 2).reshape(b, n, w), p + "attn.proj")
        if modality in ("text", "image"):
            e = "text" if modality == "text" else "imag"
            x = x + sd[p + "gamma_2"] * mlp(ln(x, p + f"norm2_{e}", cfg.eps), p + f"mlp_{e}")
        elif i >= cfg.vlffn_start:
            x = x + sd[p + "gamma_2"] * mlp(ln(x, p + "norm2_vl", cfg.eps), p + "mlp_vl")
        else:
            t, im = x[:, :cfg.max_text_len], x[:, cfg.max_text_len:]
            t = t + sd[p + "gamma_2"] * mlp(ln(t, p + "norm2_text", cfg.eps), p + "mlp_text")
            im = im + sd[p + "gamma_2"] * mlp(ln(im, p + "norm2_imag", cfg.eps), p + "mlp_imag")
            x = torch.cat([t, im], 1)
    x = ln(x, "transformer.norm", cfg.eps)
    if modality == "vl":
        pooled = torch.tanh(lin(x[:, 0], "pooler.dense"))
        y = F.gelu(F.layer_norm(lin(pooled, "vqa_classifier.0"), (2 * w,), sd["vqa_classifier.1.weight"],
                                sd["vqa_classifier.1.bias"], 1e-5))
        return lin(y, "vqa_classifier.3")
    f = F.linear(x[:, 0], sd[f"itc_{modality}_proj.fc.weight"])
    return f / f.norm(dim=-1, keepdim=True)


def inputs(cfg: VlmoConfig, batch: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=gen)
    ids = torch.randint(0, cfg.vocab_size, (batch, cfg.max_text_len), generator=gen)
    mask = torch.ones(batch, cfg.max_text_len, dtype=torch.long)
    mask[0, 4:] = 0  # a padded question; row 1 fills all positions
    return pixels, ids, mask


def test_index_sizes_at_real_size():
    """480 / 16 = 30: (2*30 - 1)^2 + 3 = 3484 image entries, 3878 rows in all, a 941 x 941 VQA index."""
    cfg = VlmoConfig()
    assert (cfg.num_relative_distance, cfg.table_rows, cfg.image_tokens) == (3484, 3878, 901)
    from vlm2om.graphs.vlmo import relative_index

    idx = relative_index(cfg, "vl")
    assert idx.shape == (941, 941) and int(idx.max()) == 3877 and int(idx.min()) == 0
    assert int(idx[1, 2]) == 1 + 194 + 3484 + 2  # text j - i = 1
    assert int(idx[3, 40]) == 3484 and int(idx[40, 3]) == 3485


@pytest.mark.parametrize("modality", ["vl", "text", "image"])
def test_index_equals_the_pairwise_definition(modality):
    from vlm2om.graphs.vlmo import relative_index

    assert torch.equal(relative_index(TINY, modality), reference_index(TINY, modality))


@pytest.mark.parametrize("modality", ["vl", "text", "image"])
@torch.no_grad()
def test_encoder_equals_the_reference(modality):
    sd = random_state(TINY, modality)
    ours = VlmoEncoder(TINY, modality).eval()
    ours.load_state_dict(sd, strict=True)  # every name the original's
    pixels, ids, mask = inputs(TINY)
    args = {"vl": (pixels, ids, mask), "text": (ids, mask), "image": (pixels,)}[modality]
    want = reference(sd, TINY, modality, pixels, ids, mask)
    got = ours(*args)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if modality == "vl":  # the padding matters: unmasking it changes row 0's logits
        assert not torch.allclose(reference(sd, TINY, modality, pixels, ids, torch.ones_like(mask))[0], want[0])


@torch.no_grad()
def test_vqa_graph_through_onnx_keeps_the_gather_and_lints_clean(tmp_path):
    sd = random_state(TINY, "vl")
    model = VlmoEncoder(TINY, "vl").eval()
    model.load_state_dict(sd)
    s, t = TINY.image_size, TINY.max_text_len

    def make(g, gen):
        pixels, ids, mask = inputs(TINY, g["batch"], seed=int(gen.initial_seed()))
        return {"pixel_values": pixels, "text_ids": ids, "text_mask": mask}

    sg = Subgraph(name="vqa", build=lambda: model,
                  inputs=[TensorDecl("pixel_values", "float32", ("batch", 3, s, s)),
                          TensorDecl("text_ids", "int64", ("batch", t)), TensorDecl("text_mask", "int64", ("batch", t))],
                  outputs=[TensorDecl("vqa_logits", "float32", ("batch", TINY.vqa_labels))],
                  make_inputs=make, gears=[{"batch": 1}, {"batch": 2}])
    path = export_onnx(sg, model, tmp_path)[0]
    graph = onnx.load(str(path))
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [13]
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("Gather") >= TINY.layers  # one bias gather per layer, not a precomputed bias
    assert not errors(lint_graph(path, "vqa")), errors(lint_graph(path, "vqa"))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 2):
        pixels, ids, mask = inputs(TINY, batch, seed=batch)
        got = sess.run(None, {"pixel_values": pixels.numpy(), "text_ids": ids.numpy(), "text_mask": mask.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), model(pixels, ids, mask), rtol=1e-4, atol=1e-5)
    assert math.isfinite(float(got.sum()))
