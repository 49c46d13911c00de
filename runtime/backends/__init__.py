"""Session backends behind one protocol; each is imported only when chosen."""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from .base import Session, TensorSpec

BACKENDS = {
    "auto": "om when the bundle has OM files for every graph and ais_bench imports, else ort",
    "ort": "onnxruntime (CPU or any installed execution provider)",
    "om": "Ascend OM files (from `vlm2om compile`) through ais_bench's InferSession",
}
# The options each backend takes; an option meant for another backend is ignored, so one
# command line (threads, device id) serves whichever backend `auto` picks.
OPTIONS = {"ort": ("threads", "providers", "spin", "arena"), "om": ("device_id",)}


def resolve_backend(backend: str, bundle) -> str:
    """``auto`` -> ``om`` or ``ort`` for this bundle; other names pass through once checked."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend '{backend}' (available: {', '.join(BACKENDS)})")
    if backend != "auto":
        return backend
    from .om import ais_bench_importable, has_om

    return "om" if has_om(bundle) and ais_bench_importable() else "ort"


def open_session(backend: str, bundle, graph_name: str, low_memory: bool = False, **options) -> Session:
    """Open the session for one graph of ``bundle`` with the named backend.

    ``low_memory``: load the graph for each run and free it afterwards, so only one graph's
    weights are ever in memory (a 7B bundle on a machine that cannot hold it; slow, since
    every decode step reloads every layer group)."""
    if low_memory:
        # onnxruntime's arena would be built and dropped with each run, so run without it (a lower peak).
        streamed = {**options, "arena": False} if resolve_backend(backend, bundle) == "ort" else options
        return StreamedSession(bundle, graph_name, lambda: open_session(backend, bundle, graph_name, **streamed))
    backend = resolve_backend(backend, bundle)
    unknown = set(options) - {o for names in OPTIONS.values() for o in names}
    if unknown:
        raise InputError(f"unknown session options {sorted(unknown)}")
    mine = {k: v for k, v in options.items() if k in OPTIONS[backend]}
    if backend == "ort":
        from .ort import OrtSession

        return OrtSession(bundle, graph_name, **mine)
    from .om import OmSession

    return OmSession(bundle, graph_name, **mine)


class StreamedSession:
    """A session that exists only while it runs (see ``open_session(low_memory=True)``)."""

    def __init__(self, bundle, graph_name: str, opener):
        entry = bundle.graph(graph_name)
        self.name, self.gears, self._open = graph_name, entry.get("gears"), opener
        self.inputs = [TensorSpec.from_manifest(e) for e in entry["inputs"]]
        self.outputs = [TensorSpec.from_manifest(e) for e in entry["outputs"]]

    def run(self, feeds):
        """The outputs are copied before the session closes: onnxruntime's output arrays keep the
        memory they live in, which is the closed session's arena (1.5 GB a group at 7B size), alive."""
        session = self._open()
        try:
            return {k: np.array(v, copy=True) for k, v in session.run(feeds).items()}
        finally:
            session.close()

    def close(self) -> None:
        pass


__all__ = ["BACKENDS", "Session", "TensorSpec", "open_session", "resolve_backend"]
