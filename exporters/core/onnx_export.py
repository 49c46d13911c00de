"""torch module -> simplified ONNX file that ATC accepts, in memory that follows one tensor.

Opset 13 with the TorchScript exporter: every Ascend ONNX example uses opset 13, CANN
5.0.4 through 8.x accept it, and at opset 13 LayerNorm/RMSNorm/softmax stay as plain
ReduceMean/Pow/Sqrt/Softmax nodes that ATC's ``--keep_dtype`` can name one by one. The
IR version is capped at 8, the newest that CANN's ONNX 1.12 reads.

The exporter itself would copy every weight several times (folded copies, the protobuf,
its serialised bytes), so the graph is traced *without* weights: parameters come out as
graph inputs named by their state-dict keys, onnxsim simplifies the weight-free graph, and
then each parameter is written as an initializer straight from the module's tensor, one
at a time, into the ONNX file or its ``.data`` side file, after the folds of weight_folds.
Even weight-free, the TorchScript exporter hands every parameter's values to its ONNX shape
inference, which copies them (3 GB for a 1 GB fp16 lm_head): ``values_hidden`` keeps them from it.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from vlm2om.exporters.core.subgraph import Subgraph
from vlm2om.exporters.core.weight_folds import fold_weights

OPSET = 13
MAX_IR_VERSION = 8
# Weights above 256 MiB go to a side file, written tensor by tensor: inline weights are copied
# into the protobuf and again into its serialised bytes, and protobuf caps at 2 GB.
EXTERNAL_DATA_BYTES = 256 << 20
_ALIGN = 64  # offsets in the side file, so a reader can map tensors in place
_CHUNK_BYTES = 64 << 20  # a non-contiguous weight goes to the side file in blocks of about this size


def export_onnx(sg: Subgraph, module: torch.nn.Module, out_dir: Path, opset: int = OPSET,
                simplify: bool = True) -> list[Path]:
    """Export ``module`` for ``sg`` with gear dims symbolic; return the files written."""
    gear = sg.trace_gear()
    feeds = sg.make_inputs(gear, torch.Generator().manual_seed(0))
    dyn = set(sg.dynamic_dims)
    axes = {}
    for decl in [*sg.inputs, *sg.outputs]:
        marked = {i: d for i, d in enumerate(decl.dims) if isinstance(d, str) and d in dyn}
        if marked:
            axes[decl.name] = marked
    path = out_dir / f"{sg.name}.onnx"
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = Path(scratch) / "graph.onnx"
        with values_hidden():
            torch.onnx.export(
                module.eval(), tuple(feeds[d.name] for d in sg.inputs), str(traced),
                dynamo=False, opset_version=opset, export_params=False, do_constant_folding=False,
                input_names=[d.name for d in sg.inputs], output_names=[d.name for d in sg.outputs],
                dynamic_axes=axes or None)
        model = onnx.load(str(traced))
    if simplify:
        model = _simplify(model, path)
    _declare_outputs(model, sg)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    for stale in out_dir.glob(f"{sg.name}.onnx*"):
        stale.unlink()
    return attach_weights(model, dict(module.state_dict()), [d.name for d in sg.inputs], path)


def _declare_outputs(model: onnx.ModelProto, sg: Subgraph) -> None:
    """The graph outputs' dims as ``sg`` declares them. The exporter's shape inference names a
    dim it cannot follow through a Slice or Reshape on a batch gear (``Slice..._dim_1``) though it
    is static; ATC and the bundle's contract need it static."""
    dyn, fixed = set(sg.dynamic_dims), sg.trace_gear()
    decls = {d.name: d for d in sg.outputs}
    for out in model.graph.output:
        decl = decls.get(out.name)
        dims = out.type.tensor_type.shape.dim
        if decl is None or len(dims) != len(decl.dims):
            continue
        for dim, want in zip(dims, decl.dims):
            if isinstance(want, str) and want in dyn:
                dim.dim_param = want
            elif isinstance(want, int) or want in fixed:
                dim.dim_value = want if isinstance(want, int) else fixed[want]


@contextmanager
def values_hidden():
    """The TorchScript exporter without the parameters' values: its graph passes and its ONNX shape
    inference take them as a name -> tensor dict, and the shape inference converts every tensor in
    it. With ``export_params=False`` and no constant folding nothing reads the values (the traced
    graph types every parameter input already), so the dict is given empty, and the exporter's
    own output is unchanged: tests/exporters/core/test_onnx_export.py compares the files."""
    from torch.onnx._internal.torchscript_exporter import utils

    named = utils._get_named_param_dict
    utils._get_named_param_dict = lambda graph, params: {}
    try:
        yield
    finally:
        utils._get_named_param_dict = named


def _simplify(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """onnxsim on the weight-free graph: it folds the shape arithmetic, which needs only the
    parameters' shapes. Its own random-input check is skipped (it would allocate every
    weight); the export verifies the finished file against torch instead."""
    import onnxsim

    with quiet_native_output() as log:
        try:
            simplified, ok = onnxsim.simplify(model, check_n=0)
        except Exception as e:  # onnxsim raises bare RuntimeErrors from C++
            raise RuntimeError(f"onnxsim failed on {path.name}: {e}\n{log.read_text()}") from None
    if not ok:
        raise RuntimeError(f"onnxsim could not simplify {path.name}:\n{log.read_text()}")
    return simplified


def attach_weights(model: onnx.ModelProto, state: dict[str, torch.Tensor], user_inputs: list[str],
                   path: Path) -> list[Path]:
    """Turn the parameter inputs into initializers, writing each tensor once; save ``path``."""
    graph = model.graph
    params = [i.name for i in graph.input if i.name not in user_inputs]
    missing = [n for n in params if n not in state]
    if missing:
        raise RuntimeError(f"{path.name}: graph inputs {missing} are neither declared inputs nor weights")
    weights = {n: (lambda t: lambda: t)(state[n].detach()) for n in params}
    shapes = {n: tuple(state[n].shape) for n in params}
    itemsize = {n: state[n].element_size() for n in params}
    fold_weights(graph, weights, shapes)
    keep_inputs = [i for i in graph.input if i.name in user_inputs]
    del graph.input[:]
    graph.input.extend(keep_inputs)
    used = list(dict.fromkeys(n for node in graph.node for n in node.input if n in weights))
    total = sum(math.prod(shapes[n]) for n in used) * max(itemsize.values(), default=0)
    data = path.with_name(path.name + ".data") if total >= EXTERNAL_DATA_BYTES else None
    with open(data, "wb") if data else nullcontext() as side:
        for name in used:
            graph.initializer.append(_initializer(weights.pop(name)(), name, side, data))
    onnx.save_model(model, str(path))
    return [path, data] if data else [path]


def _initializer(tensor: torch.Tensor, name: str, side, data: Path | None) -> onnx.TensorProto:
    if data is None:
        return numpy_helper.from_array(np.ascontiguousarray(tensor.numpy()), name)
    array = tensor.numpy()
    offset = side.tell()
    pad = -offset % _ALIGN
    side.write(b"\0" * pad)
    # A transposed weight (nn.Linear's, folded) is written in row blocks: no copy of it whole.
    rows = max(1, _CHUNK_BYTES // max(1, array[:1].nbytes)) if array.ndim else 1
    for start in range(0, max(1, len(array)) if array.ndim else 1, rows):
        block = np.ascontiguousarray(array[start:start + rows] if array.ndim else array)
        side.write(memoryview(block).cast("B"))
    t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                         dims=list(array.shape), data_location=onnx.TensorProto.EXTERNAL)
    for k, v in (("location", data.name), ("offset", str(offset + pad)), ("length", str(array.nbytes))):
        entry = t.external_data.add()
        entry.key, entry.value = k, v
    return t


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
