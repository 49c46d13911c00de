"""Export-friendly torch modules, one file per architecture.

Nothing here reads a checkpoint or writes ONNX: each module's ``forward`` is exactly the
signature of the graph that gets exported, and each file has a frozen config dataclass
whose defaults are the real model's sizes.
"""
