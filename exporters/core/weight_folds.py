"""Weight folds on a graph traced weight-free (see onnx_export), done lazily.

onnxsim folds weights only when they sit in the protobuf, and ours never do: the graph is
traced with its parameters as inputs so that no weight is ever copied in bulk. The folds
that matter for speed are therefore done here, on *thunks* (zero-argument functions that
make a tensor), so that each folded tensor is computed only when it is written, one at a
time:

* ``Concat`` of weights, and ``Mul`` of a weight by a scalar constant -> the result stored (a
  graph may pack its projections, or fold a constant scale into one, in plain torch);
* ``Split`` of a weight -> its parts stored (a graph may slice a huge projection, so that no
  single weight of it is large: ChatGLM's 130528-row lm_head);
* ``Transpose(W)`` feeding only MatMuls -> ``W^T`` stored (how nn.Linear traces);
* three or more MatMuls that share their input and all multiply by weights -> one MatMul on
  the concatenated weights and a Split (q/k/v: one GEMM instead of three), unless their outputs
  are concatenated again in order (a projection sliced on purpose, as above).

The RMSNorm scale is *not* folded into the MatMuls after it: left as Pow, ReduceMean, Add,
Sqrt, Div, Mul, onnxruntime fuses the whole norm into one SimplifiedLayerNormalization
kernel (five fewer nodes per norm); without the Mul the pattern no longer matches.
"""
from __future__ import annotations

import math
from typing import Callable

import onnx
import torch
from onnx import helper, numpy_helper

Thunk = Callable[[], torch.Tensor]
# q/k/v fuse; the two-way gate/up fusion measured slower on onnxruntime (its Split copies more).
MIN_FUSED = 3


def fold_weights(graph: onnx.GraphProto, weights: dict[str, Thunk], shapes: dict[str, tuple]) -> None:
    """Rewrite ``graph`` and ``weights`` in place; ``shapes`` tracks each weight's shape."""
    _fold_weight_ops(graph, weights, shapes)
    _fold_transposes(graph, weights, shapes)
    _fuse_shared_input(graph, weights, shapes)


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _is_output(graph: onnx.GraphProto, name: str) -> bool:
    return any(o.name == name for o in graph.output)


def _drop(graph: onnx.GraphProto, dead: list[onnx.NodeProto]) -> None:
    ids = {id(n) for n in dead}
    kept = [n for n in graph.node if id(n) not in ids]
    del graph.node[:]
    graph.node.extend(kept)


def _weight_matmul(node: onnx.NodeProto, weights: dict, shapes: dict) -> bool:
    return node.op_type == "MatMul" and node.input[1] in weights and len(shapes[node.input[1]]) == 2


def _scalar(graph: onnx.GraphProto, name: str) -> float | None:
    """The value of a one-element constant (an initializer or a Constant node's output)."""
    for t in graph.initializer:
        if t.name == name and math.prod(t.dims) == 1:
            return float(numpy_helper.to_array(t).reshape(()))
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            t = next((a.t for a in node.attribute if a.name == "value"), None)
            return float(numpy_helper.to_array(t).reshape(())) if t is not None and math.prod(t.dims) == 1 else None
    return None


def _fold_weight_ops(graph, weights, shapes) -> None:
    """Concat of weights and weight x scalar, in graph order (a fold may feed the next)."""
    dead = []
    for node in graph.node:
        if not node.output or _is_output(graph, node.output[0]):
            continue
        out = node.output[0]
        if node.op_type == "Concat" and node.input and all(i in weights for i in node.input):
            axis = next(a.i for a in node.attribute if a.name == "axis")
            parts = list(node.input)
            weights[out] = (lambda ts, ax: lambda: torch.cat([t() for t in ts], dim=ax))([weights[p] for p in parts], axis)
            ref = list(shapes[parts[0]])
            ref[axis] = sum(shapes[p][axis] for p in parts)
            shapes[out] = tuple(ref)
        elif node.op_type == "Split" and node.input and node.input[0] in weights and len(node.input) == 2:
            sizes = _ints(graph, node.input[1])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if sizes is None or len(sizes) != len(node.output):
                continue
            w, start = node.input[0], 0
            for part, size in zip(node.output, sizes):
                weights[part] = (lambda f, a, b, ax: lambda: f().narrow(ax, a, b))(weights[w], start, size, axis)
                shape = list(shapes[w])
                shape[axis] = size
                shapes[part] = tuple(shape)
                start += size
        elif node.op_type == "Mul" and len(node.input) == 2 and sum(i in weights for i in node.input) == 1:
            w = next(i for i in node.input if i in weights)
            value = _scalar(graph, next(i for i in node.input if i != w))
            if value is None:
                continue
            weights[out] = _times(weights[w], value)
            shapes[out] = shapes[w]
        else:
            continue
        dead.append(node)
    _drop(graph, dead)
    _drop_unused_constants(graph)


def _ints(graph: onnx.GraphProto, name: str) -> list[int] | None:
    """The values of an int64 constant (an initializer or a Constant node's output)."""
    for t in graph.initializer:
        if t.name == name:
            return [int(v) for v in numpy_helper.to_array(t).reshape(-1)]
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            t = next((a.t for a in node.attribute if a.name == "value"), None)
            return None if t is None else [int(v) for v in numpy_helper.to_array(t).reshape(-1)]
    return None


def _drop_unused_constants(graph) -> None:
    """Constants only a folded node read (onnxruntime would warn about each at load)."""
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    _drop(graph, [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used])
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _times(w: Thunk, value: float) -> Thunk:
    def make() -> torch.Tensor:
        t = w()
        return (t.float() * value).to(t.dtype)  # fp32 product, rounded once
    return make


def _fold_transposes(graph, weights, shapes) -> None:
    users, dead = _consumers(graph), []
    for node in graph.node:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        src = node.input[0] if node.input else None
        if node.op_type != "Transpose" or perm != [1, 0] or src not in weights or _is_output(graph, node.output[0]):
            continue
        if not all(u.op_type == "MatMul" and u.input[1] == node.output[0] for u in users.get(node.output[0], [])):
            continue
        name = f"{src}.T"
        if name not in weights:
            weights[name] = (lambda f: lambda: f().t())(weights[src])
            shapes[name] = tuple(reversed(shapes[src]))
        for u in users[node.output[0]]:
            u.input[1] = name
        dead.append(node)
    _drop(graph, dead)


def _fuse_shared_input(graph, weights, shapes) -> None:
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if _weight_matmul(node, weights, shapes):
            groups.setdefault(node.input[0], []).append(node)
    new_nodes: dict[int, list[onnx.NodeProto]] = {}
    dead = []
    users = _consumers(graph)
    for x, nodes in groups.items():
        if len(nodes) < MIN_FUSED or len({shapes[n.input[1]][0] for n in nodes}) != 1:
            continue
        outs = [n.output[0] for n in nodes]
        after = {id(u): u for o in outs for u in users.get(o, [])}
        if len(after) == 1 and next(iter(after.values())).op_type == "Concat":  # sliced on purpose
            continue
        parts = [n.input[1] for n in nodes]
        name = "cat(" + ",".join(parts) + ")"
        thunks = [weights[p] for p in parts]
        weights[name] = (lambda ts: lambda: torch.cat([t() for t in ts], dim=1))(thunks)
        sizes = [shapes[p][1] for p in parts]
        shapes[name] = (shapes[parts[0]][0], sum(sizes))
        fused, split_sizes = f"{nodes[0].output[0]}_fused", f"{nodes[0].output[0]}_sizes"
        graph.initializer.append(helper.make_tensor(split_sizes, onnx.TensorProto.INT64, [len(sizes)], sizes))
        first = min(list(graph.node).index(n) for n in nodes)
        new_nodes[first] = [
            helper.make_node("MatMul", [x, name], [fused], name=f"{nodes[0].name or fused}_fused"),
            helper.make_node("Split", [fused, split_sizes], [n.output[0] for n in nodes], axis=-1,
                             name=f"{nodes[0].name or fused}_split")]
        dead += nodes
    if not new_nodes:
        return
    ids = {id(n) for n in dead}
    rebuilt = []
    for i, n in enumerate(graph.node):
        rebuilt += new_nodes.get(i, [])
        if id(n) not in ids:
            rebuilt.append(n)
    del graph.node[:]
    graph.node.extend(rebuilt)
