"""A subprocess environment in which torch, transformers and onnxsim cannot be imported, as on
the Ascend deploy box (it has the runtime, onnxruntime or ais_bench, and CANN, but no torch)."""
from __future__ import annotations

import os
from pathlib import Path

from . import ROOT

BLOCKED = ("torch", "transformers", "onnxsim")
BLOCKER = f'''
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is blocked: a deploy box has no torch")
sys.meta_path.insert(0, _NoTorch())
'''


def no_torch_env(folder: Path, *extra_paths: Path) -> dict[str, str]:
    """os.environ with a sitecustomize in ``folder`` that blocks torch, the repository importable."""
    (folder / "sitecustomize.py").write_text(BLOCKER)
    return dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, [folder, *extra_paths, ROOT])))
