"""ATC lint: check each ONNX graph against what the target CANN's ATC accepts, before an
Ascend box spends an hour finding out.

Errors are what ATC rejects (opset, IR version, operators outside CANN's published ONNX list,
custom domains, Loop/Scan/Sequence, dynamic dims that are not declared gears, gear counts
outside 2..100, protobufs over 2 GB); warnings are what may work but deserves a look; info
lists the nodes that overflow in fp16 under ATC's default ``force_fp16``, which
``keep_dtype_plan`` turns into ATC's ``--keep_dtype`` list. Facts: docs/bundle.md and the
operator lists beside this file (each names its source and CANN version).
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from vlm2om.runtime.errors import InputError

from vlm2om.exporters.ascend.atc import MAX_GEARS, MIN_GEARS
from vlm2om.exporters.ascend.findings import Finding
from vlm2om.exporters.ascend.fp16 import fp16_findings

DATA = Path(__file__).resolve().parent  # the CANN operator lists beside this file
PROTOBUF_LIMIT = 2 ** 31  # protobuf refuses messages of 2 GiB and more
NO_CONTROL_FLOW = ("Loop", "Scan")  # plus every Sequence* op


@dataclass(frozen=True)
class CannTarget:
    """What one CANN release's ATC reads: its opset range, the newest ONNX IR version its ONNX
    library parses, its operator list, and its dynamic dims per gear limit."""

    version: str
    opset_min: int
    opset_max: int
    max_ir_version: int
    ops_file: str
    max_dims_per_gear: int | None = None  # error above this
    warn_dims_per_gear: int | None = None  # warning above this (older point releases)
    note: str = ""


TARGETS = {
    "5.0": CannTarget("5.0", 9, 13, 7, "cann_onnx_ops_5.0.4.txt", max_dims_per_gear=4),
    "6.0": CannTarget("6.0", 9, 13, 7, "cann_onnx_ops_5.0.4.txt", max_dims_per_gear=4,
                      note="CANN 6.0.1 reads ONNX 1.8.0 like 5.0.4; the 5.0.4 operator list is used"),
    "7.0": CannTarget("7.0", 9, 18, 8, "cann_onnx_ops_8.0.0.txt", warn_dims_per_gear=4,
                      note="CANN 7.0's operator list was not retrieved; the 8.0.0 list is the closest"),
    "8.0": CannTarget("8.0", 9, 18, 8, "cann_onnx_ops_8.0.0.txt"),
}
DEFAULT_CANN = "7.0"


def cann_target(version: str) -> CannTarget:
    """'7.0', '7.0.0' or '7.0.RC1' -> the 7.0 target; unknown versions are an error."""
    key = ".".join(str(version).split(".")[:2])
    if key not in TARGETS:
        raise InputError(f"unknown CANN version '{version}' (known: {', '.join(TARGETS)})")
    return TARGETS[key]


def cann_ops(target: CannTarget) -> frozenset[str]:
    """The target's operator list, lower-cased (CANN prints Argmax, ONNX says ArgMax)."""
    lines = (DATA / target.ops_file).read_text().splitlines()
    return frozenset(s.strip().lower() for s in lines if s.strip() and not s.startswith("#"))


def _onnx():
    try:
        import onnx
    except ImportError:
        raise InputError("the ATC lint reads ONNX files with the 'onnx' package: pip install onnx") from None
    return onnx


def _all_nodes(graph):
    """Nodes of ``graph`` and of every subgraph (If branches), which ATC compiles too."""
    from onnx import AttributeProto

    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == AttributeProto.GRAPH:
                yield from _all_nodes(a.g)
            elif a.type == AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _all_nodes(g)


def _first(names: list[str], total: int) -> str:
    return names[0] + (f" (+{total - 1} more)" if total > 1 else "")


def _check_model(model, graph: str, target: CannTarget) -> list[Finding]:
    out = []
    if model.ir_version > target.max_ir_version:
        out.append(Finding("error", graph, "ir_version", "model", str(model.ir_version),
                           f"CANN {target.version}'s ONNX library reads IR version <= {target.max_ir_version}; "
                           "re-save with an older IR version (onnx.helper.make_model(..., ir_version=...))"))
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not default:
        out.append(Finding("error", graph, "opset", "opset_import", "none",
                           "the model imports no default-domain opset"))
    elif not target.opset_min <= default[0] <= target.opset_max:
        out.append(Finding("error", graph, "opset", "opset_import", str(default[0]),
                           f"CANN {target.version} accepts opsets {target.opset_min}-{target.opset_max}; "
                           "export at opset 13, what every Ascend example uses"))
    for o in model.opset_import:
        if o.domain not in ("", "ai.onnx"):
            out.append(Finding("error", graph, "domain", "opset_import", o.domain,
                               "ATC knows only the default ONNX domain: no com.microsoft or custom ops"))
    ops = cann_ops(target)
    by_op: dict[tuple[str, str], list[str]] = defaultdict(list)
    for node in _all_nodes(model.graph):
        by_op[(node.domain, node.op_type)].append(node.name or f"<unnamed {node.op_type}>")
    for (domain, op), names in sorted(by_op.items()):
        where = _first(names, len(names))
        if domain not in ("", "ai.onnx"):
            out.append(Finding("error", graph, "domain", where, f"{domain}::{op}",
                               "a custom-domain op; ATC has no kernel for it: export it as standard ONNX ops"))
        elif op in NO_CONTROL_FLOW or op.startswith("Sequence") or op.endswith(("ToSequence", "FromSequence")):
            out.append(Finding("error", graph, "control_flow", where, op,
                               "ATC compiles no Loop/Scan/Sequence ops: unroll loops at export and keep "
                               "tensor sequences out of the graph"))
        elif op.lower() not in ops:
            out.append(Finding("error", graph, "op", where, op,
                               f"not in CANN {target.version}'s ONNX operator list ({target.ops_file}); "
                               "decompose it into listed ops"))
    return out


def _dims(value_info) -> list:
    """ONNX dims: int when fixed, the dim_param (or '?') when dynamic."""
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


def _check_io(model, graph: str, entry: dict | None) -> list[Finding]:
    init = {i.name for i in model.graph.initializer}
    onnx_in = [i for i in model.graph.input if i.name not in init]
    if entry is None:  # a bare ONNX file: no gear plan to compare with
        return [Finding("warning", graph, "dynamic_dim", f"{vi.name}[{axis}]", str(d),
                        "dynamic, and a bare ONNX file declares no gears: ATC needs a value in "
                        "--input_shape, or export through vlm2om to get a gear plan")
                for vi in onnx_in for axis, d in enumerate(_dims(vi)) if isinstance(d, str)]
    out = []
    gears = entry.get("gears") or []
    gear_dims = set.intersection(*(set(g) for g in gears)) if gears else set()
    for kind, actual, declared in (("inputs", onnx_in, entry["inputs"]), ("outputs", model.graph.output,
                                                                            entry["outputs"])):
        names, want = [v.name for v in actual], [s["name"] for s in declared]
        if names != want:
            out.append(Finding("error", graph, "io", kind, ", ".join(names),
                               f"the manifest declares {kind} {want} in that order; ATC's --input_shape "
                               "and the runtime's feeds follow the manifest"))
            continue
        for vi, spec in zip(actual, declared):
            out += _check_dims(graph, kind, vi.name, _dims(vi), spec["shape"], gear_dims)
    return out


def _check_dims(graph, kind, name, dims, shape, gear_dims) -> list[Finding]:
    if len(dims) != len(shape):
        return [Finding("error", graph, "io", name, f"rank {len(dims)}",
                        f"the manifest declares shape {shape} (rank {len(shape)})")]
    out = []
    for axis, (d, m) in enumerate(zip(dims, shape)):
        where = f"{name}[{axis}]"
        if isinstance(m, str) and m not in gear_dims:
            out.append(Finding("error", graph, "dynamic_dim", where, m,
                               "a dynamic dim that is not a declared gear: every gear must give it a value"))
        elif isinstance(m, str) and isinstance(d, int):
            out.append(Finding("error", graph, "dynamic_dim", where, f"{d} (manifest: gear '{m}')",
                               "the ONNX graph fixes a dim the manifest declares as a gear"))
        elif isinstance(m, int) and isinstance(d, str):
            out.append(Finding("warning", graph, "dynamic_dim", where, d,
                               f"dynamic in the ONNX graph but static {m} in the manifest"
                               + ("" if kind == "outputs" else "; ATC pins it via --input_shape")))
        elif isinstance(m, int) and d != m:
            out.append(Finding("error", graph, "io", where, str(d), f"the manifest declares {m}"))
    return out


def _check_gears(graph: str, entry: dict, target: CannTarget) -> list[Finding]:
    order = [d for s in entry["inputs"] for d in s["shape"] if isinstance(d, str)]  # ATC's -1s, in order
    gears = entry.get("gears") or []
    if not order:
        return [Finding("warning", graph, "gears", "gears", str(len(gears)),
                        "gears declared but no input has a gear dim: ATC compiles one static shape")] if gears else []
    out = []
    if not MIN_GEARS <= len(gears) <= MAX_GEARS:
        out.append(Finding("error", graph, "gears", "gears", str(len(gears)),
                           f"ATC --dynamic_dims takes {MIN_GEARS}..{MAX_GEARS} gears per graph"))
    seen: dict[tuple, int] = {}
    named = set().union(*gears)  # a dim no gear names is already a dynamic_dim finding
    for i, g in enumerate(gears):
        bad = {d: g.get(d) for d in dict.fromkeys(order)
               if d in named and (not isinstance(g.get(d), int) or g.get(d) < 1)}
        if bad:
            out.append(Finding("error", graph, "gears", f"gear {i}", json.dumps(g),
                               f"every gear needs a positive int for each gear dim; bad: {bad}"))
            continue
        key = tuple(g[d] for d in order if d in named)
        if key and key in seen:
            out.append(Finding("error", graph, "gears", f"gear {i}", json.dumps(g),
                               f"the same --dynamic_dims values as gear {seen[key]}"))
        seen.setdefault(key, i)
    for limit, sev, who in ((target.max_dims_per_gear, "error", f"ATC of CANN {target.version} accepts"),
                            (target.warn_dims_per_gear, "warning", f"some CANN {target.version} releases "
                                                                   "(with the 23.0 Atlas drivers) accept")):
        if limit is not None and len(order) > limit:
            out.append(Finding(sev, graph, "gears", "dynamic_dims", f"{len(order)} dims per gear",
                               f"{who} at most {limit} dynamic dims per gear"))
            break
    return out


def _check_files(model, graph: str, path: Path) -> list[Finding]:
    out = []
    size = path.stat().st_size
    if size >= PROTOBUF_LIMIT:
        out.append(Finding("error", graph, "size", path.name, f"{size / 2 ** 30:.2f} GiB",
                           "a protobuf must stay under 2 GB: store the weights as external data"))
    from onnx import TensorProto

    missing = Counter()
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location", "")
            if not (path.parent / loc).is_file():
                missing[loc] += 1
    for loc, n in missing.items():
        out.append(Finding("error", graph, "external_data", path.name, loc,
                           f"{n} initializers live in this file, which is not beside the graph "
                           "(ATC resolves it from the ONNX folder)"))
    return out


def lint_graph(path: Path, graph: str, entry: dict | None = None, cann: str = DEFAULT_CANN) -> list[Finding]:
    """Findings for one ONNX file; ``entry`` is its manifest ``graphs`` entry (None: a bare file)."""
    onnx, target, path = _onnx(), cann_target(cann), Path(path)
    if not path.is_file():
        return [Finding("error", graph, "file", str(path.name), "missing", "the graph's ONNX file does not exist")]
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises its own DecodeError types
        return [Finding("error", graph, "file", path.name, type(e).__name__, f"not a readable ONNX model: {e}")]
    out = _check_model(model, graph, target) + _check_io(model, graph, entry)
    if entry is not None:
        out += _check_gears(graph, entry, target)
    return out + _check_files(model, graph, path) + fp16_findings(model.graph, graph, _all_nodes)


def lint_bundle_files(folder: Path, graphs: dict[str, dict], cann: str = DEFAULT_CANN) -> list[Finding]:
    """Lint every graph of a bundle (or of a staging folder before its manifest exists):
    ``graphs`` is the manifest's ``graphs`` mapping, each entry's ``file`` relative to ``folder``."""
    return [f for name, entry in graphs.items()
            for f in lint_graph(Path(folder) / entry["file"], name, entry, cann)]


def lint_path(path: Path, cann: str = DEFAULT_CANN) -> list[Finding]:
    """A bundle folder (its manifest gives the gear plan) or one bare ``.onnx`` file."""
    path = Path(path)
    if path.is_dir():
        from vlm2om.runtime.bundle import MANIFEST, read_manifest
        from vlm2om.runtime.manifest_check import check_manifest
        from vlm2om.runtime.schema import upgrade

        mpath = path / MANIFEST
        if not mpath.is_file():
            raise InputError(f"'{path}' is not a bundle: {MANIFEST} is missing")
        manifest = upgrade(read_manifest(mpath), str(mpath))
        check_manifest(manifest, str(mpath))  # a damaged manifest is named, not linted
        graphs = manifest["graphs"]
        return _check_hashes(path, manifest) + lint_bundle_files(path, graphs, cann)
    if path.suffix != ".onnx" or not path.is_file():
        raise InputError(f"'{path}' is neither a bundle folder nor an .onnx file")
    return lint_graph(path, path.stem, None, cann)


def _check_hashes(path: Path, manifest: dict) -> list[Finding]:
    """Every ONNX and external-data file the manifest lists has its recorded size and sha256
    (ATC would compile an altered graph without a word)."""
    from vlm2om.runtime.bundle import sha256_file

    graph_files = {f for g in manifest["graphs"].values() for f in [g.get("file"), *g.get("external_data", [])] if f}
    out = []
    for name, meta in (manifest.get("files") or {}).items():
        if name not in graph_files:
            continue  # OM files, the tokenizer...: the runtime checks them when the bundle opens
        p = path / name
        if not p.is_file():
            continue  # lint_graph reports a missing graph file
        if p.stat().st_size != meta.get("bytes") or sha256_file(p) != meta.get("sha256"):
            out.append(Finding("error", next((g for g, e in manifest["graphs"].items()
                                              if name in (e.get("file"), *e.get("external_data", []))), "?"),
                               "hash", name, "sha256 differs",
                               "the file is not the one the export wrote and verified: re-export the bundle"))
    return out


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]


def keep_dtype_plan(findings: list[Finding]) -> dict[str, list[str]]:
    """graph -> node names ATC's ``--keep_dtype`` keeps in fp32 (from the fp16 findings)."""
    plan: dict[str, dict[str, None]] = {}  # dicts keep the first-seen order without repeats
    for f in findings:
        if f.check == "fp16":
            plan.setdefault(f.graph, {}).update(dict.fromkeys(f.nodes))
    return {graph: list(names) for graph, names in plan.items()}


def format_table(findings: list[Finding], show_info: bool = True, width: int = 44) -> str:
    """A fixed-width table, errors first, then a one-line summary."""
    order = {"error": 0, "warning": 1, "info": 2}
    rows = [f for f in sorted(findings, key=lambda f: order[f.severity]) if show_info or f.severity != "info"]
    cut = lambda s: s if len(s) <= width else s[:width - 3] + "..."  # noqa: E731
    table = [("SEVERITY", "GRAPH", "CHECK", "WHERE", "VALUE", "WHY")]
    table += [(f.severity, f.graph, f.check, cut(f.where), cut(f.value), f.message) for f in rows]
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5] for r in table]
    n = Counter(f.severity for f in findings)
    lines.append(f"{n['error']} errors, {n['warning']} warnings, {n['info']} info "
                 f"({'ATC will reject this' if n['error'] else 'ATC should accept this'})")
    return "\n".join(lines if rows else lines[-1:])
