"""The fp16 precision plan: nodes that overflow or lose their answer when ATC's default
``force_fp16`` runs them in half precision (fp16 tops out at 65504).

- norm variance: LayerNorm/RMSNorm square the activations (``Pow`` 2, or ``ReduceSumSquare``),
  average them and take a root; x^2 overflows once |x| > 256, which LLM activations exceed.
  The whole chain (square, reduce, +eps, sqrt or rsqrt, divide) is kept together, since a
  float32 variance that is cast back to fp16 before its +eps or sqrt overflows just the same.
- softmax / exp: exp overflows above ~11.
- reductions: sums over long axes overflow or round away small terms.

Each category becomes one info finding whose ``nodes`` are what ``--keep_dtype`` lists.
"""
from __future__ import annotations

from collections import defaultdict

from vlm2om.exporters.ascend.findings import Finding

REDUCTIONS = ("ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceProd")
SQUARES = ("ReduceSumSquare", "ReduceL2")  # square inside the reduction
CHAIN_ON = ("Add", "Sqrt", "Pow", "Reciprocal")  # the variance's way to its root
CHAIN_END = ("Div", "Mul")  # where the normalised activations come out

WHY = {
    "norm variance": "LayerNorm/RMSNorm variance: x^2 overflows fp16 once |x| > 256; keep the chain in fp32",
    "softmax": "softmax exponentiates and sums: overflows fp16 on large logits",
    "exp": "exp overflows fp16 above ~11",
    "reduction": "a sum over a long axis overflows or rounds away small terms in fp16",
}


def keep_name(node) -> str:
    """How ``--keep_dtype`` names a node: its name, or every op of its type when it has none."""
    return node.name or f"OpType::{node.op_type}"


def _is_square(node, constants: dict) -> bool:
    if node is None or node.op_type != "Pow" or len(node.input) < 2:
        return False
    exp = constants.get(node.input[1])
    return exp is None or float(exp) == 2.0  # an unknown exponent is flagged to be safe


def _constants(graph) -> dict:
    """Scalar constants by tensor name (initializers and Constant nodes), for Pow exponents."""
    from onnx import numpy_helper

    out = {}
    for t in graph.initializer:
        if len(t.dims) == 0 or (len(t.dims) == 1 and t.dims[0] == 1):
            out[t.name] = numpy_helper.to_array(t).reshape(-1)[0]
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and len(a.t.dims) <= 1 and (not a.t.dims or a.t.dims[0] == 1):
                    out[n.output[0]] = numpy_helper.to_array(a.t).reshape(-1)[0]
    return out


def _norm_chains(graph) -> list:
    producer = {o: n for n in graph.node for o in n.output}
    consumers = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    constants = _constants(graph)
    chains = []
    for red in graph.node:
        if red.op_type not in REDUCTIONS or not red.input:
            continue
        pow_node = producer.get(red.input[0])
        if not (red.op_type in SQUARES or _is_square(pow_node, constants)):
            continue
        chain = ([pow_node] if red.op_type not in SQUARES else []) + [red]
        cur = red
        while len(consumers[cur.output[0]]) == 1:
            nxt = consumers[cur.output[0]][0]
            if nxt.op_type not in CHAIN_ON + CHAIN_END:
                break
            chain.append(nxt)
            if nxt.op_type in CHAIN_END:
                break
            cur = nxt
        chains.append(chain)
    return chains


def fp16_findings(graph, graph_name: str, all_nodes) -> list[Finding]:
    """One info finding per category present in ``graph`` (``all_nodes`` walks subgraphs)."""
    picked: dict[str, list] = defaultdict(list)
    in_chain = set()
    for chain in _norm_chains(graph):
        picked["norm variance"] += chain
        in_chain |= {id(n) for n in chain}
    for n in all_nodes(graph):
        if n.op_type == "LayerNormalization":
            picked["norm variance"].append(n)
        elif n.op_type in ("Softmax", "LogSoftmax"):
            picked["softmax"].append(n)
        elif n.op_type in ("Exp", "ReduceLogSumExp"):
            picked["exp"].append(n)
        elif n.op_type in REDUCTIONS and id(n) not in in_chain:
            picked["reduction"].append(n)
    out = []
    for category in WHY:
        nodes = list(dict.fromkeys(keep_name(n) for n in picked.get(category, [])))
        if nodes:
            ops = ",".join(dict.fromkeys(n.op_type for n in picked[category]))
            where = nodes[0] + (f" (+{len(nodes) - 1} more)" if len(nodes) > 1 else "")
            out.append(Finding("info", graph_name, "fp16", where, ops, WHY[category], tuple(nodes)))
    return out
