"""Ascend OM backend: one ais_bench ``InferSession`` per graph, imported only when chosen.

ais_bench runs exactly the shapes ATC compiled and picks no gear itself, so feeds go as a
list in the graph's input order (a bare array would be iterated along axis 0), already
padded by the runtime to one declared gear, with ``mode='dymdims'`` for geared graphs and
``'static'`` otherwise. Outputs may come back flat, and as float16 under ATC's force_fp16,
so each is reshaped to its declared shape at the fed gear and cast to the manifest dtype.
The OM file is the one ``vlm2om compile`` recorded in the manifest (with its sha256).
"""
from __future__ import annotations

import numpy as np

from ..errors import BundleError
from .base import TensorSpec, check_feeds

INSTALL_HINT = ("the OM backend needs ais_bench and aclruntime (the ais_bench inference tool's wheels, "
                "installed on the Ascend box with the CANN toolkit's set_env.sh sourced)")


def om_entry(bundle, graph_name: str) -> dict:
    """The manifest's record of the graph's compiled OM file."""
    om = bundle.manifest.get("atc", {}).get("om", {}).get(graph_name)
    if not om:
        raise BundleError(f"bundle '{bundle.root}' has no OM file for graph '{graph_name}': "
                          "run `vlm2om compile` on the Ascend box first")
    return om


def has_om(bundle) -> bool:
    """Every graph of the bundle has a compiled OM file recorded."""
    oms = bundle.manifest.get("atc", {}).get("om", {})
    return all(oms.get(name) for name in bundle.manifest["graphs"])


def ais_bench_importable() -> bool:
    try:
        from ais_bench.infer.interface import InferSession  # noqa: F401
    except ImportError:
        return False
    return True


class OmSession:
    def __init__(self, bundle, graph_name: str, device_id: int = 0):
        try:
            from ais_bench.infer.interface import InferSession
        except ImportError as e:
            raise BundleError(f"{INSTALL_HINT}: {e}") from None
        entry = bundle.graph(graph_name)
        self.name = graph_name
        self.gears = entry.get("gears")
        self.inputs = [TensorSpec.from_manifest(e) for e in entry["inputs"]]
        self.outputs = [TensorSpec.from_manifest(e) for e in entry["outputs"]]
        self._mode = "dymdims" if self.gears else "static"
        path = bundle.path(om_entry(bundle, graph_name)["file"])
        try:
            self._sess = InferSession(int(device_id), str(path))
        except Exception as e:  # aclruntime raises RuntimeError and its own types
            raise BundleError(f"ais_bench cannot load '{path}' on device {device_id}: {e}") from e
        self._check_model(path)

    def _check_model(self, path) -> None:
        """The OM's inputs are the manifest's, in order; its outputs agree in count (and in
        their fixed dims where the OM reports the full rank)."""
        declared = [s.name for s in self.inputs]
        actual = [i.name for i in self._sess.get_inputs()]
        if actual != declared:
            self.close()
            raise BundleError(f"'{path}' has inputs {actual}, the manifest declares {declared}")
        outs = self._sess.get_outputs()
        bad = len(outs) != len(self.outputs) or any(
            len(o.shape) == len(s.shape) and any(isinstance(m, int) and 0 <= d != m for d, m in zip(o.shape, s.shape))
            for o, s in zip(outs, self.outputs))
        if bad:
            got = [(o.name, list(o.shape)) for o in outs]
            self.close()
            raise BundleError(f"'{path}' has outputs {got}, the manifest declares "
                              f"{[(s.name, list(s.shape)) for s in self.outputs]}")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        gear = check_feeds(self.name, self.inputs, self.gears, feeds)
        arrays = [np.ascontiguousarray(feeds[s.name], dtype=s.dtype) for s in self.inputs]
        outs = self._sess.infer(arrays, mode=self._mode)
        result = {}
        for spec, out in zip(self.outputs, outs):
            shape, out = spec.concrete(gear), np.asarray(out)
            if out.size != int(np.prod(shape)):
                raise BundleError(f"graph '{self.name}' output '{spec.name}' at gear {gear}: the OM returned "
                                  f"{out.size} values for declared shape {shape}")
            result[spec.name] = out.reshape(shape).astype(spec.dtype, copy=False)
        return result

    def close(self) -> None:
        if getattr(self, "_sess", None) is not None:
            self._sess.free_resource()
            self._sess = None
