"""Session backends behind one protocol; each is imported only when chosen."""
from __future__ import annotations

from ..errors import InputError
from .base import Session, TensorSpec

BACKENDS = {"ort": "onnxruntime (CPU or any installed execution provider)"}


def open_session(backend: str, bundle, graph_name: str, **options) -> Session:
    """Open the session for one graph of ``bundle`` with the named backend."""
    if backend == "ort":
        from .ort import OrtSession

        return OrtSession(bundle, graph_name, **options)
    raise InputError(f"unknown backend '{backend}' (available: {', '.join(BACKENDS)})")


__all__ = ["BACKENDS", "Session", "TensorSpec", "open_session"]
