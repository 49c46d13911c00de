"""The layering rules of DESIGN.md, checked on the source tree: what each layer may import,
no import circles, small files."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT
from tests.helpers.no_torch import no_torch_env

LINE_BUDGET = 400
# Source folder -> the package it installs as (pyproject's package-dir).
PACKAGES = {"vlm2om": "vlm2om", "graphs": "vlm2om.graphs", "exporters": "vlm2om.exporters",
            "runtime": "vlm2om.runtime"}
TORCH_SIDE = {"torch", "transformers", "onnx", "onnxsim"}


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _module(path: Path) -> str:
    """The installed module name of a source file: exporters/core/driver.py -> vlm2om.exporters.core.driver."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(f): f for folder in PACKAGES for f in _files(folder)}


def _imports(path: Path) -> set[str]:
    """Every module a file imports, absolute (relative imports resolved), anywhere in the file.
    ``from pkg import a, b`` counts as ``pkg.a``/``pkg.b`` where those are modules of ours, and as
    ``pkg`` itself only where a name is not (a name read from a half-initialized package fails)."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
            names |= subs if len(subs) == len(node.names) else subs | {base}
    return names


def _bad(folder: str, forbidden: set[str]) -> dict[str, set[str]]:
    found = {}
    for f in _files(folder):
        hit = {n for n in _imports(f) if any(n == b or n.startswith(b + ".") for b in forbidden)}
        if hit:
            found[str(f.relative_to(ROOT))] = hit
    return found


def test_imports_use_the_vlm2om_namespace():
    """The folders install as vlm2om.*; a bare ``graphs``/``exporters``/``runtime`` import would
    find nothing (or another project's package) on an installed box."""
    assert _bad("vlm2om", {"graphs", "exporters", "runtime"}) == {}
    for folder in ("graphs", "exporters", "runtime"):
        assert _bad(folder, {"graphs", "exporters", "runtime"}) == {}


def test_runtime_never_imports_torch_or_the_export_side():
    assert _bad("runtime", TORCH_SIDE | {"vlm2om.exporters", "vlm2om.graphs"}) == {}


def test_graphs_never_read_checkpoints_or_write_onnx():
    assert _bad("graphs", {"onnx", "onnxruntime", "safetensors", "vlm2om.exporters", "vlm2om.runtime"}) == {}
    for f in _files("graphs"):
        text = f.read_text()
        assert "torch.load" not in text and "torch.onnx" not in text, f.relative_to(ROOT)


def test_ascend_side_never_imports_torch():
    assert _bad("exporters/ascend", {"torch", "transformers", "onnxsim"}) == {}


def test_ascend_side_imports_without_torch_transitively(tmp_path):
    """What compile and lint import, all the way down, runs on a box where torch is unimportable."""
    probe = ("import sys, vlm2om.exporters.ascend.compile, vlm2om.exporters.ascend.lint\n"
             "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'onnxsim'))\n"
             "assert not bad, bad\nprint('ASCEND-NO-TORCH-OK')\n")
    r = subprocess.run([sys.executable, "-c", probe], env=no_torch_env(tmp_path), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ASCEND-NO-TORCH-OK" in r.stdout, r.stderr


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a self-import."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    """Across vlm2om/, graphs/, exporters/ and runtime/, function-level imports included: a
    module that needs a lazy import to break a circle is in the wrong layer."""
    graph = {m: {n for n in _imports(f) if n in MODULES and n != m} for m, f in MODULES.items()}
    assert len(graph) > 50  # the walk found the tree
    assert _cycles(graph) == []


def test_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_tests_share_code_through_helpers_only():
    """A test file never imports another test file: what they share lives in tests/helpers/."""
    for f in _files("tests"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n.split(".")[0].startswith(("test_", "conftest")) for n in names), f
            bad = [n for n in names if n.startswith("tests.") and not n.startswith("tests.helpers")]
            relative = isinstance(node, ast.ImportFrom) and node.level and "helpers" not in f.parts
            assert not bad and not relative, f.relative_to(ROOT)


def test_files_stay_small():
    for folder in (*PACKAGES, "tests"):
        for f in _files(folder):
            n = len(f.read_text().splitlines())
            assert n <= LINE_BUDGET, f"{f.relative_to(ROOT)} has {n} lines (budget {LINE_BUDGET})"
