"""The model families vlm2om exports, registered once: recipe and torch reference together.

``FAMILIES`` names each family's package without importing it, so the CLI's help and its
error messages need no torch; ``get_family`` imports a package when that family is used.

A new family adds one folder here and one line in ``FAMILIES``. Its ``__init__.py`` exposes
``FAMILY_API``:

- ``ExportOptions``: a frozen dataclass subclassing ``core.options.RecipeOptions``; its own
  fields are the family's export options (the CLI offers them for that family only);
- ``PRESETS``: preset name -> seeded random weights at toy or benchmark size;
- ``plan(opts)``: the ExportPlan the driver writes (image graphs, embed, decoder groups);
- ``build_modules(opts)``: every torch module at once (``core.plan.ReferenceModules``);
- ``Reference``: the torch reference pipeline (a ``verify.torch_reference.TorchReference``)
  that preprocesses, prompts and generates as the original code does.

Inside a folder the imports run one way: ``checkpoint.py`` (the weight tables) and
``options.py`` (ExportOptions and the Parts record) import neither of the others;
``loader.py`` makes Parts from a checkpoint folder with both; ``recipe.py`` (presets, prompt,
plan) makes them from a preset or through the loader; ``reference.py`` stands apart.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from vlm2om.runtime.errors import InputError

FAMILY_API = ("ExportOptions", "PRESETS", "plan", "build_modules", "Reference")


@dataclass(frozen=True)
class Family:
    name: str  # the CLI's MODEL argument and the manifest's "family"
    title: str  # what the user knows it as
    module: str  # its package, imported only by get_family


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("minigpt4", "MiniGPT-4 (Vicuna-7B v0)", "vlm2om.exporters.families.minigpt4"),
    Family("llava15", "LLaVA-1.5 (Vicuna-7B v1.5)", "vlm2om.exporters.families.llava15"),
    Family("visualglm", "VisualGLM-6B (ChatGLM-6B)", "vlm2om.exporters.families.visualglm"),
    Family("ixc2-vl", "InternLM-XComposer2-VL-7B (InternLM2-7B, Partial LoRA)", "vlm2om.exporters.families.ixc2.vl"),
    Family("ixc2-4khd", "InternLM-XComposer2-4KHD-7B (HD crops, Partial LoRA)", "vlm2om.exporters.families.ixc2.hd"),
)}


def get_family(name: str) -> ModuleType:
    """The family package for ``name`` (see ``FAMILY_API``); unknown names list the known ones."""
    if name not in FAMILIES:
        raise InputError(f"unknown model '{name}' (available: {', '.join(FAMILIES)})")
    module = importlib.import_module(FAMILIES[name].module)
    missing = [n for n in FAMILY_API if not hasattr(module, n)]
    if missing:
        raise TypeError(f"family package {module.__name__} does not define {', '.join(missing)}")
    return module


def make_reference(modules, manifest: dict, tokenizer: bytes | None = None):
    """The torch reference pipeline of the bundle's family (``modules`` None: pixels and prompt
    ids only, as ``export --golden`` needs)."""
    family = manifest.get("family")
    if family not in FAMILIES:
        raise InputError(f"no PyTorch reference pipeline for {family} bundles (available: {', '.join(FAMILIES)})")
    return get_family(family).Reference(modules, manifest, tokenizer)
