"""vlm2om: vision-language models as static ONNX/OM subgraphs and a torch-free runtime.

The three layers install under this one namespace (the source tree keeps them at the top
level): ``vlm2om.graphs`` (export-friendly torch modules), ``vlm2om.exporters`` (checkpoints
to a verified bundle, and the CLI) and ``vlm2om.runtime`` (running a bundle, no torch).
The Python API is the runtime's::

    from vlm2om import open_bundle
    pipe = open_bundle("build/minigpt4")
    print(pipe.generate("cat.jpg", "What is in the picture?"))
"""
from __future__ import annotations

_API = ("Bundle", "BundleError", "GenerationConfig", "InputError", "Vlm2omError", "open_bundle")


def __getattr__(name: str):
    # Lazy, so that `import vlm2om.graphs` on an export box does not load the runtime first.
    if name in _API:
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'vlm2om' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])


__all__ = list(_API)
