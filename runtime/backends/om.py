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
from .base import FileTensor, TensorSpec, check_feeds, check_graph_file, io_problems

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
        self._label = om_entry(bundle, graph_name)["file"]
        path = bundle.path(self._label)
        try:
            self._sess = InferSession(int(device_id), str(path))
        except Exception as e:  # aclruntime raises RuntimeError and its own types
            raise BundleError(f"ais_bench cannot load '{path}' on device {device_id}: {e}") from e
        self._check_model()

    def _check_model(self) -> None:
        """The OM's inputs are the manifest's, in order, with their static dims; its outputs agree in
        count (OM output names need not be the ONNX ones) and in their static dims where the OM
        reports the full rank. Dtypes and gear dims are not compared: ATC's precision modes may
        change the one, and an OM may report the other at one of its values."""
        def described(values):
            return [FileTensor(v.name, None, tuple(v.shape)) for v in values]

        problems = (io_problems("input", self.inputs, described(self._sess.get_inputs()), self.gears,
                                strict_gears=False)
                    + io_problems("output", self.outputs, described(self._sess.get_outputs()), self.gears,
                                  by_name=False, ranks_may_differ=True, strict_gears=False))
        if problems:
            self.close()
        check_graph_file(self.name, self._label, problems, "compile it again with `vlm2om compile`")

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
