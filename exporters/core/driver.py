"""The export driver every recipe uses: subgraphs -> ONNX -> verify -> bundle.

The bundle is assembled in a hidden staging folder next to ``out`` and renamed into
place only when everything passed, so an interrupted or failed export leaves nothing
behind and never damages the bundle that was there before.
"""
from __future__ import annotations

import gc
import json
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vlm2om.runtime.bundle import MANIFEST, SCHEMA_VERSION, Bundle, sha256_file
from vlm2om.runtime.errors import InputError

from vlm2om.exporters.ascend import atc
from vlm2om.exporters.core.extras import ExportExtras, apply_batch_gears, verification_entry
from vlm2om.exporters.verify.golden import GoldenWriter
from vlm2om.exporters.verify.trace import EndToEndTrace
from vlm2om.exporters.core.onnx_export import OPSET, export_onnx
from vlm2om.exporters.core.plan import ExportPlan
from vlm2om.exporters.core.staging import staging_dir, writing
from vlm2om.exporters.core.subgraph import Subgraph
from vlm2om.exporters.verify.metrics import judge, raise_on_failures


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for dist in ("vlm2om", "torch", "onnx", "onnxruntime", "onnxsim"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:  # e.g. vlm2om run from a source tree
            pass
    return versions


def peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def torch_outputs(sg: Subgraph, module: torch.nn.Module) -> list[tuple[dict, dict, tuple]]:
    """(gear, feeds, torch outputs) at each verification gear, computed before the module is freed."""
    cases = []
    for gear in sg.verify_gears():
        feeds = sg.make_inputs(gear, torch.Generator().manual_seed(1))
        with torch.no_grad():
            out = module(*[feeds[d.name] for d in sg.inputs])
        out = out if isinstance(out, tuple) else (out,)
        cases.append((gear, {k: v.numpy() for k, v in feeds.items()}, tuple(o.float().numpy() for o in out)))
    return cases


def verify_graph(sg: Subgraph, path: Path, cases: list, dtype: str) -> list:
    """onnxruntime on the written file against the torch outputs, gear by gear."""
    import onnxruntime as ort

    from vlm2om.runtime.backends.ort import session_options

    opts = session_options(spin=False)  # the process's thread policy (a shared pool, if one exists)
    # Pre-packed MatMul weights would be a second copy of the graph's weights; an export runs
    # each graph a few times only, so memory matters more than the speed packing buys.
    opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.enable_cpu_mem_arena = False
    if dtype == "float16":
        # onnxruntime's CPU kernels compute fp16 MatMuls in fp32. Optimised, it converts every
        # weight to an fp32 copy at load (about three times the file at the peak: 2.94 GiB for
        # VisualGLM's 1.4 GB last group); unoptimised, each weight is cast when it is used, and in
        # priority order the cast runs next to its MatMul and is freed after it (1.70 GiB).
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    rows = []
    for gear, feeds, expected in cases:
        actual = sess.run([d.name for d in sg.outputs], feeds)
        for decl, a, e in zip(sg.outputs, actual, expected):
            shown = {k: v for k, v in gear.items() if k in sg.dynamic_dims}
            rows.append(judge(sg.name, decl.name, shown, a, e.astype(a.dtype), dtype))
    return rows


def tensor_entry(sg: Subgraph, d) -> dict:
    return {"name": d.name, "dtype": d.dtype, "shape": sg.manifest_shape(d), **({"role": d.role} if d.role else {}),
            **({"layer": d.layer} if d.layer is not None else {})}


def graph_entry(sg: Subgraph, files: list[Path], rows: list) -> dict:
    return {
        "file": files[0].name, "external_data": [f.name for f in files[1:]],
        "inputs": [tensor_entry(sg, d) for d in sg.inputs],
        "outputs": [tensor_entry(sg, d) for d in sg.outputs],
        "gears": sg.manifest_gears(),
        "verification": [{"output": r.output, "gear": r.gear, "max_abs": r.max_abs, "mean_abs": r.mean_abs,
                          "cosine": r.cosine, "rel_euclid": r.rel_euclid} for r in rows],
        **sg.extra,
    }


def _lint(folder: Path, graphs: dict, echo, keep_going: bool) -> dict[str, list[str]]:
    """ATC lint of the written graphs: errors stop the export unless ``keep_going``; the fp16
    findings become the --keep_dtype plan recorded for ``vlm2om compile``."""
    from vlm2om.exporters.ascend.lint import errors, format_table, keep_dtype_plan, lint_bundle_files

    findings = lint_bundle_files(folder, graphs)
    bad = errors(findings)
    echo("ATC lint:\n" + format_table(findings, show_info=False))
    if bad and not keep_going:
        raise LintFailed(f"{len(bad)} ATC lint error(s); the bundle was not written "
                         "(--keep-going writes it anyway):\n" + format_table(bad))
    return keep_dtype_plan(findings)


class LintFailed(InputError):
    pass


def write_bundle(plan: ExportPlan, out: Path, echo: Callable[[str], None] = print,
                 simplify: bool = True, keep_going: bool = False, extras: ExportExtras | None = None) -> Bundle:
    extras = extras or ExportExtras()  # --golden, --batch-gears
    apply_batch_gears(plan, extras.batch_gears)
    t0, n = time.perf_counter(), len(plan.subgraphs)
    graphs: dict[str, dict] = {}
    with staging_dir(Path(out), echo) as tmp:
        with writing("golden.npz"):
            golden = GoldenWriter(tmp) if extras.golden else None
        trace = EndToEndTrace(plan, echo) if extras.golden else None
        for i, sg in enumerate(plan.subgraphs, 1):
            t1 = time.perf_counter()
            echo(f"[{i}/{n}] {sg.name}: loading weights ...")
            module = sg.build()
            echo(f"[{i}/{n}] {sg.name}: exporting to ONNX (opset {OPSET}, {plan.dtype}) ...")
            with writing(f"{sg.name}.onnx"):
                files = export_onnx(sg, module, tmp, simplify=simplify)
            cases = torch_outputs(sg, module)
            if trace:
                trace.feed(sg.name, module)
            del module  # one graph's weights in memory: torch's copy goes before onnxruntime's
            gc.collect()
            rows = verify_graph(sg, files[0], cases, plan.dtype)
            echo("\n".join(r.row() for r in rows))
            raise_on_failures(rows, plan.dtype)
            if golden:
                with writing("golden.npz"):
                    golden.add(sg.name, [d.name for d in sg.inputs], [d.name for d in sg.outputs], cases,
                               sg.dynamic_dims)
            graphs[sg.name] = graph_entry(sg, files, rows)
            size = sum(f.stat().st_size for f in files) / 2**20
            echo(f"[{i}/{n}] {sg.name}: {size:.1f} MiB verified in {time.perf_counter() - t1:.1f}s "
                 f"(peak memory so far {peak_rss_gib():.2f} GiB)")
        keep_dtype = _lint(tmp, graphs, echo, keep_going)
        e2e = trace.arrays() if trace else {}
        with writing("golden.npz"):
            if e2e:
                golden.add_end_to_end(trace.entry(), e2e)
            elif trace:
                golden.end_to_end_missing = trace.skipped
            golden_entry = golden.close() if golden else None
        for name, content in plan.assets.items():
            with writing(name):
                (tmp / name).write_bytes(content)
        commands = {name: atc.render(args) for name, args in atc.graph_commands(graphs, keep_dtype=keep_dtype).items()}
        with writing("compile_om.sh"):
            (tmp / "compile_om.sh").write_text(atc.compile_script(graphs, keep_dtype=keep_dtype))
            (tmp / "compile_om.sh").chmod(0o755)
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "schema_version": SCHEMA_VERSION, "family": plan.family, "variant": plan.variant, "task": plan.task,
            "dtype": plan.dtype,
            "provenance": {**plan.provenance, "opset": OPSET, "tools": tool_versions(),
                           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            "files": files, "graphs": graphs, "verification": verification_entry(plan.dtype, golden_entry),
            **plan.manifest,
            "atc": {"commands": commands, "default_soc": atc.DEFAULT_SOC,
                    "precision_mode": atc.DEFAULT_PRECISION, "keep_dtype": keep_dtype, "om": {}},
        }
        with writing(MANIFEST):
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=_json_default))
    echo(f"bundle written to {out} in {time.perf_counter() - t0:.1f}s")
    return Bundle.open(out)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")
