"""torch module -> simplified ONNX file that ATC accepts.

Opset 13 with the TorchScript exporter: every Ascend ONNX example uses opset 13, CANN
5.0.4 through 8.x accept it, and at opset 13 LayerNorm/RMSNorm/softmax stay as plain
ReduceMean/Pow/Sqrt/Softmax nodes that ATC's ``--keep_dtype`` can name one by one. The
IR version is capped at 8, the newest that CANN's ONNX 1.12 reads.
"""
from __future__ import annotations

import os
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import onnx
import torch

from .subgraph import Subgraph

OPSET = 13
MAX_IR_VERSION = 8
EXTERNAL_DATA_BYTES = 1 << 30  # weights above 1 GiB go to a side file (protobuf caps at 2 GB)


def export_onnx(sg: Subgraph, out_dir: Path, opset: int = OPSET, simplify: bool = True) -> list[Path]:
    """Export ``sg`` at its trace gear with gear dims symbolic; return the files written."""
    gear = sg.trace_gear()
    feeds = sg.make_inputs(gear, torch.Generator().manual_seed(0))
    dyn = set(sg.dynamic_dims)
    axes = {}
    for decl in [*sg.inputs, *sg.outputs]:
        marked = {i: d for i, d in enumerate(decl.dims) if isinstance(d, str) and d in dyn}
        if marked:
            axes[decl.name] = marked
    path = out_dir / f"{sg.name}.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            sg.module.eval(), tuple(feeds[d.name] for d in sg.inputs), str(path),
            dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=[d.name for d in sg.inputs], output_names=[d.name for d in sg.outputs],
            dynamic_axes=axes or None)
    model = onnx.load(str(path))
    if simplify:
        model = _simplify(model, path)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    for stale in out_dir.glob(f"{sg.name}.onnx*"):
        stale.unlink()
    return save_model(model, path)


def _simplify(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    if model.ByteSize() >= 2**31 - 1:  # onnxsim works on one in-memory protobuf
        return model
    import onnxsim

    with quiet_native_output() as log:
        simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise RuntimeError(f"onnxsim could not validate the simplified {path.name}:\n{log.read_text()}")
    return simplified


def save_model(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write ``path`` (+ ``path.data`` when the weights are large); return both paths."""
    weights = sum(t.ByteSize() for t in model.graph.initializer)
    if weights < EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path))
        return [path]
    data = path.with_name(path.name + ".data")
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return [path, data]


@contextmanager
def quiet_native_output():
    """Send C-level stdout/stderr (onnxsim's per-op chatter) to a log file for the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "native.log"
        with open(log, "wb") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                yield log
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                for fd in saved:
                    os.close(fd)
