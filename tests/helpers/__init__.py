"""What the tests share, in one place: tiny checkpoint writers, the fake CANN toolkit, the
ais_bench stand-in, the no-torch blocker, bundle tampering and the family coverage table.

Test files import from here and never from each other. Modules here import torch, onnx or
transformers only where they need them, so that a subprocess on a "deploy box" (no torch)
can still import the ais_bench stand-in.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
SAMPLE_IMAGE = ROOT / "examples" / "sample.png"


def run_cli(*args, timeout: int = 300, **kw):
    """``python -m vlm2om ARGS`` in a fresh process from the repository root, output captured."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "vlm2om", *map(str, args)], cwd=kw.pop("cwd", ROOT),
                          capture_output=True, text=kw.pop("text", True), timeout=timeout, **kw)
