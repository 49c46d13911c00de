"""The layering rules of DESIGN.md, checked on the source tree."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINE_BUDGET = 400


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _files(pkg: str):
    return sorted((ROOT / pkg).rglob("*.py"))


def test_runtime_never_imports_torch_or_exporters():
    for f in _files("runtime"):
        bad = _imports(f) & {"torch", "transformers", "onnx", "onnxsim", "graphs", "exporters"}
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def test_graphs_never_read_checkpoints_or_write_onnx():
    for f in _files("graphs"):
        bad = _imports(f) & {"onnx", "onnxruntime", "safetensors", "exporters", "runtime"}
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"
        assert "torch.load" not in f.read_text() and "torch.onnx" not in f.read_text()


def test_files_stay_small():
    for pkg in ("graphs", "exporters", "runtime"):
        for f in _files(pkg):
            n = len(f.read_text().splitlines())
            assert n <= LINE_BUDGET, f"{f.relative_to(ROOT)} has {n} lines (budget {LINE_BUDGET})"
