"""Attributes of a package loaded on first use: a family package names its recipe and reference
(which import torch) without importing them, so that the CLI parses its options torch-free."""
from __future__ import annotations

import importlib


def lazy_attributes(package: str, table: dict[str, tuple[str, str]]):
    """A module ``__getattr__`` for ``package``: ``table`` maps a name to (submodule, attribute)."""
    def __getattr__(name: str):
        if name in table:
            module, attr = table[name]
            return getattr(importlib.import_module(f"{package}.{module}"), attr)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
