"""A STAND-IN for ais_bench's ``InferSession``, for tests on machines without an Ascend NPU.

It is not ais_bench. It implements the documented contract strictly and computes with
onnxruntime underneath, on the ONNX graph that the fake ATC (``helpers/fake_cann.py``) named in the
"OM" file, with the shapes that fake ATC compiled:

- ``InferSession(device_id, model_path)``; ``get_inputs()`` / ``get_outputs()`` give
  descriptors with ``.name``, ``.shape`` (-1 on gear dims) and ``.datatype``;
- ``infer(feeds, mode=...)`` takes a list (a bare array is rejected: the real one iterates it
  along axis 0), exactly ``len(get_inputs())`` feeds of the compiled dtypes, only the modes
  the real code accepts, ``'dymdims'`` for a graph compiled with ``--dynamic_dims`` and
  ``'static'`` otherwise, and shapes that equal one compiled gear exactly (ais_bench picks no
  gear); outputs come back flattened;
- ``free_resource()`` releases the session; using it afterwards fails.

``install(monkeypatch)`` puts it in ``sys.modules`` as ``ais_bench.infer.interface``;
``subprocess_path(folder)`` does the same for a fresh ``python -m vlm2om`` process.
"""
from __future__ import annotations

import json
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

MODES = ("static", "dymbatch", "dymhw", "dymdims", "dymshape")  # what the real infer() accepts
SESSIONS: list["InferSession"] = []  # every session created, for tests to inspect
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
               "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


@dataclass
class TensorDesc:
    name: str
    shape: list
    datatype: str


def _parse_shapes(text: str) -> dict[str, list[int]]:
    return {name: [int(d) for d in dims.split(",")]
            for name, dims in (part.rsplit(":", 1) for part in text.split(";"))}


class InferSession:
    def __init__(self, device_id: int, model_path: str, acl_json_path=None, debug=False, loop=1):
        if not isinstance(device_id, int):
            raise TypeError(f"device_id must be an int, got {type(device_id).__name__}")
        path = Path(model_path)
        om = json.loads(path.read_text())  # raises like aclruntime does on a missing/bad file
        if om.get("fake_om") != 1:
            raise RuntimeError(f"{model_path} is not an OM file the fake ATC wrote")
        self.device_id, self.model_path, self.freed, self.calls = device_id, model_path, False, []
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self._ort = ort.InferenceSession(str(path.parent / om["model"]), opts, providers=["CPUExecutionProvider"])
        compiled = _parse_shapes(om["input_shape"])
        self._inputs = [TensorDesc(i.name, compiled[i.name], np.dtype(_ORT_DTYPES[i.type]).name)
                        for i in self._ort.get_inputs()]
        dims = om["dynamic_dims"]
        self._gears = None if dims is None else {tuple(int(v) for v in g.split(",")) for g in dims.split(";")}
        # OM output names need not be the ONNX names: callers must go by position.
        self._outputs = [TensorDesc(f"standin_output_{k}", [d if isinstance(d, int) else -1 for d in o.shape],
                                    np.dtype(_ORT_DTYPES[o.type]).name) for k, o in enumerate(self._ort.get_outputs())]
        SESSIONS.append(self)

    def get_inputs(self) -> list[TensorDesc]:
        return list(self._inputs)

    def get_outputs(self) -> list[TensorDesc]:
        return list(self._outputs)

    def infer(self, feeds, mode: str = "static", custom_sizes=100000, out_array: bool = True):
        if self.freed:
            raise RuntimeError("infer after free_resource()")
        if mode not in MODES:
            raise RuntimeError(f"mode '{mode}' is not one of {MODES}")
        if isinstance(feeds, np.ndarray) or not isinstance(feeds, (list, tuple)):
            raise TypeError("feeds must be a list of arrays; a bare array would be iterated along axis 0")
        if len(feeds) != len(self._inputs):
            raise RuntimeError(f"{len(feeds)} feeds for a model with {len(self._inputs)} inputs")
        want = "static" if self._gears is None else "dymdims"
        if mode != want:
            raise RuntimeError(f"mode '{mode}' on a model compiled for '{want}'")
        dyn = []
        for desc, a in zip(self._inputs, feeds):
            if not isinstance(a, np.ndarray) or a.dtype.name != desc.datatype:
                raise RuntimeError(f"input '{desc.name}': expected a {desc.datatype} array, got "
                                   f"{getattr(a, 'dtype', type(a).__name__)}")
            if len(a.shape) != len(desc.shape) or any(w not in (-1, d) for d, w in zip(a.shape, desc.shape)):
                raise RuntimeError(f"input '{desc.name}': shape {a.shape} does not fit compiled {desc.shape}")
            dyn += [d for d, w in zip(a.shape, desc.shape) if w == -1]
        if self._gears is not None and tuple(dyn) not in self._gears:
            raise RuntimeError(f"the dynamic_dims parameter is not correct: {dyn} is not a compiled gear")
        self.calls.append({"mode": mode, "shapes": [a.shape for a in feeds]})
        outs = self._ort.run(None, {d.name: a for d, a in zip(self._inputs, feeds)})
        return [o.reshape(-1) for o in outs]  # flat, as OM outputs may come back

    def free_resource(self) -> None:
        self.freed = True


def install(monkeypatch) -> None:
    """Make ``from ais_bench.infer.interface import InferSession`` find this stand-in."""
    SESSIONS.clear()
    pkg, infer, interface = (types.ModuleType(n) for n in ("ais_bench", "ais_bench.infer",
                                                           "ais_bench.infer.interface"))
    interface.InferSession = InferSession
    pkg.infer, infer.interface = infer, interface
    for mod in (pkg, infer, interface):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)


def uninstall_for_test(monkeypatch) -> None:
    """Make the import fail, as on a box without ais_bench."""
    for name in ("ais_bench", "ais_bench.infer", "ais_bench.infer.interface"):
        monkeypatch.setitem(sys.modules, name, None)


_SITECUSTOMIZE = """
import sys, types
from tests.helpers import ais_bench_standin as s
pkg, inf, itf = (types.ModuleType(n) for n in ("ais_bench", "ais_bench.infer", "ais_bench.infer.interface"))
itf.InferSession = s.InferSession
pkg.infer, inf.interface = inf, itf
sys.modules.update({m.__name__: m for m in (pkg, inf, itf)})
"""


def subprocess_path(folder: Path) -> str:
    """A PYTHONPATH under which ``import ais_bench.infer.interface`` finds this stand-in: a
    sitecustomize in ``folder`` installs it at interpreter start (the repository is on the path)."""
    from . import ROOT

    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    return os.pathsep.join([str(folder), str(ROOT)])
