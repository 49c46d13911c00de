"""onnxruntime backend: one InferenceSession per graph, fed the same gear shapes as the NPU."""
from __future__ import annotations

import os

import numpy as np

from ..errors import BundleError
from .base import FileTensor, TensorSpec, check_feeds, check_graph_file, io_problems

# onnxruntime's element type names -> numpy's
ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16", "tensor(int8)": "int8",
              "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


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


_POOL: dict[str, int] = {}  # how this process's sessions get threads, fixed by its first session


def session_options(threads: int = 0, spin: bool = False):
    """onnxruntime SessionOptions with this process's thread policy, which its first session fixes
    (onnxruntime refuses to mix the two once a shared pool exists):

    * ``spin``: one intra-op pool of ``threads`` threads (0: all cores) that every session shares
      and whose threads spin between ops. On a quiet machine a decode step is about 15% faster
      (134M parameters, 2 cores); pools of their own would each spin and steal the cores from the
      next group's session (a step then costs several times more). But when other processes
      compete for the cores, spinning threads burn the time slices the working one needs: at a
      load average of 3.5 on 2 cores a step took 53-92 ms spinning against 35-66 ms without.
    * otherwise (the default) each session has a pool of its own whose threads sleep between ops:
      steady under load.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not _POOL:
        if spin:
            import onnxruntime.capi._pybind_state as C

            C.set_global_thread_pool_sizes(threads or os.cpu_count() or 1, 1)
            _POOL["shared"] = threads or os.cpu_count() or 1
        else:
            _POOL["own"] = 1
    if "shared" in _POOL:
        opts.use_per_session_threads = False
    else:
        opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class OrtSession:
    def __init__(self, bundle, graph_name: str, threads: int = 0,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",), spin: bool = False, arena: bool = True):
        """``threads``, ``spin``: see ``session_options``; ``arena`` False: no CPU memory arena (a
        session that runs once, as ``low_memory`` opens them, gains nothing from one)."""
        import onnxruntime as ort

        entry = bundle.graph(graph_name)
        self.name = graph_name
        self.gears = entry.get("gears")
        self.inputs = [TensorSpec.from_manifest(e) for e in entry["inputs"]]
        self.outputs = [TensorSpec.from_manifest(e) for e in entry["outputs"]]
        opts = session_options(threads, spin)
        opts.enable_cpu_mem_arena = arena
        if not prepack_fits(bundle):
            opts.add_session_config_entry("session.disable_prepacking", "1")
        path = bundle.path(entry["file"])
        try:
            self._sess = ort.InferenceSession(str(path), opts, providers=list(providers))
        except Exception as e:  # onnxruntime raises its own exception types
            raise BundleError(f"graph '{graph_name}': onnxruntime cannot load '{path}': {e}") from e
        active = self._sess.get_providers()
        if active[0] != providers[0]:
            raise BundleError(f"asked for {providers[0]} but onnxruntime runs {active[0]}")
        self._check_file(entry["file"])
        self._out_names = [s.name for s in self.outputs]

    def _check_file(self, label: str) -> None:
        """The ONNX file's inputs and outputs are the manifest's (names, dtypes, static dims): a file
        from another export fails here, by name, not inside onnxruntime's first run."""
        def described(values):
            return [FileTensor(v.name, ORT_DTYPES.get(v.type, v.type), tuple(v.shape)) for v in values]

        problems = (io_problems("input", self.inputs, described(self._sess.get_inputs()), self.gears)
                    + io_problems("output", self.outputs, described(self._sess.get_outputs()), self.gears))
        if problems:
            self._sess = None
        check_graph_file(self.name, label, problems, "re-export it")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.name, self.inputs, self.gears, feeds)
        outs = self._sess.run(self._out_names, {s.name: feeds[s.name] for s in self.inputs})
        return dict(zip(self._out_names, outs))

    def close(self) -> None:
        self._sess = None
