"""The export holds one graph's weights at a time, writes big weights to a side file, and
folds weights without changing what the graph computes."""
from __future__ import annotations

import gc
import tempfile
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from vlm2om.exporters.families.minigpt4 import recipe as minigpt4

from vlm2om.exporters.core import onnx_export
from vlm2om.exporters.core.driver import write_bundle
from vlm2om.runtime import GenerationConfig, open_bundle


def test_each_graph_is_built_only_after_the_previous_one_is_freed(tmp_path, tiny_opts):
    plan = minigpt4.plan(tiny_opts)
    alive: list[tuple[str, weakref.ref]] = []

    def tracked(sg, build):
        def make():
            gc.collect()
            still = [name for name, ref in alive if ref() is not None]
            assert not still, f"building {sg.name} while {still} is still in memory"
            module = build()
            alive.append((sg.name, weakref.ref(module)))
            return module
        return make

    for sg in plan.subgraphs:
        sg.build = tracked(sg, sg.build)
    write_bundle(plan, tmp_path / "b", echo=lambda s: None)
    assert [name for name, _ in alive] == [sg.name for sg in plan.subgraphs]


def test_side_file_weights_are_aligned_and_run(tmp_path, tiny_opts, monkeypatch, sample_image):
    """Force every graph's weights into a .data side file; the bundle verifies and chats."""
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "b"
    write_bundle(minigpt4.plan(tiny_opts), out, echo=lambda s: None)
    for name in ("vision", "decoder_1"):
        model = onnx.load(str(out / f"{name}.onnx"), load_external_data=False)
        ext = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert ext and all({e.key: e.value for e in t.external_data}["location"] == f"{name}.onnx.data"
                           for t in ext)
        assert all(int({e.key: e.value for e in t.external_data}["offset"]) % 64 == 0 for t in ext)
    pipe = open_bundle(out)
    assert pipe.bundle.graph("decoder_1")["external_data"] == ["decoder_1.onnx.data"]
    pipe.generate(sample_image, "What is it?", GenerationConfig(max_new_tokens=4, do_sample=False))


def test_weight_folds_keep_the_numbers(tiny_opts):
    """Transposes and the packed, pre-scaled q/k/v weight are folded, the RMSNorms stay in the
    pattern onnxruntime fuses, and the graph still equals torch."""
    sg = [s for s in minigpt4.plan(tiny_opts).subgraphs if s.name == "decoder_1"][0]
    module = sg.build()
    with tempfile.TemporaryDirectory() as d:
        path = onnx_export.export_onnx(sg, module, Path(d))[0]
        model = onnx.load(str(path))
        ops = [n.op_type for n in model.graph.node]
        inits = {t.name for t in model.graph.initializer}
        assert not any(n.op_type == "Transpose" and n.input[0] in inits for n in model.graph.node)
        assert not any(n.op_type in ("Concat", "Mul") and all(i in inits for i in n.input) for n in model.graph.node)
        layers = len(module.layers)
        weight_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
        assert len(weight_matmuls) == 5 * layers + module.is_last, "q/k/v one MatMul, o, gate, up, down"
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(Path(d) / "optimized.onnx")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        fused = [n.op_type for n in onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node]
        assert fused.count("SimplifiedLayerNormalization") == 2 * layers + module.is_last
        feeds = sg.make_inputs(sg.gears[-1], torch.Generator().manual_seed(3))
        got = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
    with torch.no_grad():
        want = module(*[feeds[d.name] for d in sg.inputs])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def fp16_bundle(tmp_path_factory):
    opts = minigpt4.ExportOptions(preset="tiny", layers_per_group=1, dtype="float16")
    return write_bundle(minigpt4.plan(opts), tmp_path_factory.mktemp("fp16") / "b", echo=lambda s: None)


@pytest.mark.parametrize("name", ["vision", "bridge", "decoder_0"])
def test_float16_graphs_verify_against_float16_torch(fp16_bundle, name):
    """fp16 export: LayerNorms stay fp32, everything else fp16; onnxruntime agrees with torch."""
    entry = fp16_bundle.graph(name)
    assert {i["dtype"] for i in entry["inputs"] if i["name"] != "attention_mask"} <= {"float16", "int64"}
    assert all(r["cosine"] >= 0.999 for r in entry["verification"])
    model = onnx.load(str(fp16_bundle.root / f"{name}.onnx"))
    dtypes = {t.data_type for t in model.graph.initializer if len(t.dims) >= 2}
    assert dtypes == {onnx.TensorProto.FLOAT16}, "matrices are stored in fp16"


def test_sliced_lm_head_is_folded_into_parts_not_fused_back(tmp_path, monkeypatch):
    """ChatGLM's lm_head in vocabulary slices: the Split of the weight folds into one initializer
    per slice (each written in row blocks to the side file), the slices' MatMuls are not fused back
    into one, and the graph computes what the unsliced torch module computes."""
    from vlm2om.exporters.core.subgraph import Subgraph, TensorDecl
    from vlm2om.graphs import chatglm
    from vlm2om.graphs.chatglm import ChatGLMConfig, ChatGLMDecoderGroup

    cfg = ChatGLMConfig(vocab_size=700, hidden=32, layers=1, heads=2, ffn=64, max_positions=32)
    group = ChatGLMDecoderGroup(cfg, 0, 1, kv_layout="per_layer")
    torch.manual_seed(0)
    for p in group.parameters():
        p.data.normal_(0, 0.2)
    want = group(torch.randn(1, 3, 32), torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 0),
                 torch.zeros(1, 2, 0, 16), torch.zeros(1, 2, 0, 16))[0]
    monkeypatch.setattr(chatglm, "LM_HEAD_ROWS", 256)  # 700 rows -> slices of 256, 256, 188
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    monkeypatch.setattr(onnx_export, "_CHUNK_BYTES", 1000)  # several row blocks per slice
    sg = Subgraph("head", lambda: group, [TensorDecl("x", "float32", (1, 3, 32))],
                  [TensorDecl("logits", "float32", (1, 3, 700))], lambda gear, gen: {"x": torch.randn(1, 3, 32)})

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.g = group

        def forward(self, x):
            return self.g(x, torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 0),
                          torch.zeros(1, 2, 0, 16), torch.zeros(1, 2, 0, 16))[0]

    x = torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(1))
    files = onnx_export.export_onnx(sg, Head(), tmp_path, simplify=False)
    model = onnx.load(str(files[0]), load_external_data=False)
    heads = sorted(tuple(t.dims) for t in model.graph.initializer if len(t.dims) == 2 and t.dims[0] == 32
                   and t.dims[1] in (188, 256))
    assert heads == [(32, 188), (32, 256), (32, 256)]
    assert "lm_head.weight" not in {t.name for t in model.graph.initializer}  # only its slices are stored
    ops = [n.op_type for n in model.graph.node]
    assert ops[-4:] == ["MatMul", "MatMul", "MatMul", "Concat"]
    assert not [n for n in model.graph.node if n.op_type == "Split" and "lm_head" in n.input[0]]
    got = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        expected = Head()(x)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)
    assert want.shape == (1, 3, 700)
