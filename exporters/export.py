"""The export driver every recipe uses: subgraphs -> ONNX -> verify -> bundle.

The bundle is assembled in a hidden staging folder next to ``out`` and renamed into
place only when everything passed, so an interrupted or failed export leaves nothing
behind and never damages the bundle that was there before.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from runtime.bundle import MANIFEST, SCHEMA_VERSION, Bundle, sha256_file
from runtime.errors import InputError

from . import atc
from .onnx_export import OPSET, export_onnx
from .subgraph import Subgraph
from .verify import judge, raise_on_failures


@dataclass
class ExportPlan:
    family: str
    variant: str
    dtype: str
    subgraphs: list[Subgraph]
    assets: dict[str, bytes]  # bundle-relative name -> content (tokenizer, ...)
    manifest: dict  # family entries: pipeline, kv_cache, tokenizer, prompt, generation, preprocess
    provenance: dict = field(default_factory=dict)


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for dist in ("vlm2om", "torch", "onnx", "onnxruntime", "onnxsim"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:  # e.g. vlm2om run from a source tree
            pass
    return versions


@contextmanager
def staging_dir(out: Path):
    """Yield an empty folder beside ``out``; on success swap it in, on failure remove it."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise InputError(f"output '{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise InputError(f"output '{out}' is a non-empty folder that is not a bundle; refusing to replace it")
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        tmp.mkdir()
    except OSError as e:
        raise InputError(f"cannot write the bundle to '{out}': {e.strerror or e}") from None
    try:
        yield tmp
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # folders this export made, innermost first
            try:
                p.rmdir()
            except OSError:
                break
        raise


def verify_graph(sg: Subgraph, path: Path, dtype: str) -> list:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    rows = []
    for gear in sg.verify_gears():
        feeds = sg.make_inputs(gear, torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = sg.module(*[feeds[d.name] for d in sg.inputs])
        expected = expected if isinstance(expected, tuple) else (expected,)
        actual = sess.run([d.name for d in sg.outputs], {k: v.numpy() for k, v in feeds.items()})
        for decl, a, e in zip(sg.outputs, actual, expected):
            shown = {k: v for k, v in gear.items() if k in sg.dynamic_dims}
            rows.append(judge(sg.name, decl.name, shown, a, e.float().numpy().astype(a.dtype), dtype))
    return rows


def graph_entry(sg: Subgraph, files: list[Path], rows: list) -> dict:
    return {
        "file": files[0].name, "external_data": [f.name for f in files[1:]],
        "inputs": [{"name": d.name, "dtype": d.dtype, "shape": sg.manifest_shape(d)} for d in sg.inputs],
        "outputs": [{"name": d.name, "dtype": d.dtype, "shape": sg.manifest_shape(d)} for d in sg.outputs],
        "gears": sg.manifest_gears(),
        "verification": [{"output": r.output, "gear": r.gear, "max_abs": r.max_abs, "mean_abs": r.mean_abs,
                          "cosine": r.cosine, "rel_euclid": r.rel_euclid} for r in rows],
        **sg.extra,
    }


def write_bundle(plan: ExportPlan, out: Path, echo: Callable[[str], None] = print,
                 simplify: bool = True) -> Bundle:
    t0, n = time.perf_counter(), len(plan.subgraphs)
    graphs: dict[str, dict] = {}
    with staging_dir(Path(out)) as tmp:
        for i, sg in enumerate(plan.subgraphs, 1):
            echo(f"[{i}/{n}] {sg.name}: exporting to ONNX (opset {OPSET}) ...")
            files = export_onnx(sg, tmp, simplify=simplify)
            rows = verify_graph(sg, files[0], plan.dtype)
            echo("\n".join(r.row() for r in rows))
            raise_on_failures(rows, plan.dtype)
            graphs[sg.name] = graph_entry(sg, files, rows)
            sg.module = None  # free the weights of a graph once written and verified
        for name, content in plan.assets.items():
            (tmp / name).write_bytes(content)
        commands = {name: atc.render(atc.atc_args(name, g)) for name, g in graphs.items()}
        (tmp / "compile_om.sh").write_text(atc.compile_script(graphs))
        (tmp / "compile_om.sh").chmod(0o755)
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "schema_version": SCHEMA_VERSION, "family": plan.family, "variant": plan.variant,
            "dtype": plan.dtype,
            "provenance": {**plan.provenance, "opset": OPSET, "tools": tool_versions(),
                           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            "files": files, "graphs": graphs, **plan.manifest,
            "atc": {"commands": commands, "default_soc": atc.DEFAULT_SOC,
                    "precision_mode": atc.DEFAULT_PRECISION, "om": {}},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=_json_default))
    echo(f"bundle written to {out} in {time.perf_counter() - t0:.1f}s")
    return Bundle.open(out)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")
