"""One decoder group exported as ATC takes it and run on onnxruntime against its torch module:
the check every LLM graph's tests make."""
from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from tests.helpers.hf_weights import close
from vlm2om.exporters.ascend.lint import errors, lint_graph
from vlm2om.exporters.core.onnx_export import export_onnx

# ops ATC rejects or that would make a gear's shape depend on the data
FORBIDDEN = {"Range", "Trilu", "If", "Loop", "Scan", "NonZero"}


@torch.no_grad()
def check_onnx_group(sg, group: torch.nn.Module, out: Path, atol: float = 1e-5) -> list[float]:
    """Export ``group`` for ``sg``: opset 13, none of FORBIDDEN, lint clean, onnxruntime equal to
    torch (``atol``) on every gear of ``sg``; returns each output's max abs difference."""
    path = export_onnx(sg, group, out)[0]
    model = onnx.load(str(path))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [13]
    ops = {node.op_type for node in model.graph.node}
    assert not ops & FORBIDDEN, ops
    assert not errors(lint_graph(path, "decoder")), errors(lint_graph(path, "decoder"))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diffs = []
    for gear in sg.gears:
        feeds = sg.make_inputs(gear, torch.Generator().manual_seed(gear["seq"]))
        want = group(*(feeds[d.name] for d in sg.inputs))
        got = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
        for decl, w, g in zip(sg.outputs, want, got):
            diffs.append(close(torch.from_numpy(g), w, f"{decl.name} at {gear}", atol))
    return diffs
