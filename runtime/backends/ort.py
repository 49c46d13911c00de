"""onnxruntime backend: one InferenceSession per graph, fed the same gear shapes as the NPU."""
from __future__ import annotations

import os

import numpy as np

from ..errors import BundleError
from .base import TensorSpec, check_feeds


def prepack_fits(bundle) -> bool:
    """onnxruntime pre-packs MatMul weights for speed, keeping a second, wider copy of them (fp16
    weights are packed as fp32); a 7B fp16 bundle would need three times its size. Pack only
    when that fits the machine's memory."""
    weights = sum(f.get("bytes", 0) for f in bundle.manifest.get("files", {}).values())
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf: keep onnxruntime's default
        return True
    return 3 * weights < ram


class OrtSession:
    def __init__(self, bundle, graph_name: str, threads: int = 0,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)):
        import onnxruntime as ort

        entry = bundle.graph(graph_name)
        self.name = graph_name
        self.gears = entry.get("gears")
        self.inputs = [TensorSpec.from_manifest(e) for e in entry["inputs"]]
        self.outputs = [TensorSpec.from_manifest(e) for e in entry["outputs"]]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        # Several sessions share the cores; spinning idle pools would steal them from the next graph.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not prepack_fits(bundle):
            opts.add_session_config_entry("session.disable_prepacking", "1")
        path = bundle.path(entry["file"])
        try:
            self._sess = ort.InferenceSession(str(path), opts, providers=list(providers))
        except Exception as e:  # onnxruntime raises its own exception types
            raise BundleError(f"onnxruntime cannot load '{path}': {e}") from e
        active = self._sess.get_providers()
        if active[0] != providers[0]:
            raise BundleError(f"asked for {providers[0]} but onnxruntime runs {active[0]}")
        declared = [s.name for s in self.inputs]
        actual = [i.name for i in self._sess.get_inputs()]
        if declared != actual:
            raise BundleError(f"'{path}' has inputs {actual}, the manifest declares {declared}")
        self._out_names = [s.name for s in self.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.name, self.inputs, self.gears, feeds)
        outs = self._sess.run(self._out_names, {s.name: feeds[s.name] for s in self.inputs})
        return dict(zip(self._out_names, outs))

    def close(self) -> None:
        self._sess = None
