"""Checkpoints -> subgraphs -> ONNX -> verify -> bundle, and the ``vlm2om`` CLI.

Recipes register by name; ``RECIPES`` maps each name to its module so that the CLI
imports torch and a recipe only when that model is exported.
"""
from __future__ import annotations

import importlib

RECIPES = {"minigpt4": "vlm2om.exporters.families.minigpt4.recipe", "llava15": "vlm2om.exporters.families.llava15.recipe"}


def get_recipe(name: str):
    """Import and return the recipe module for ``name``; unknown names list the known ones."""
    from vlm2om.runtime.errors import InputError

    if name not in RECIPES:
        raise InputError(f"unknown model '{name}' (available: {', '.join(sorted(RECIPES))})")
    return importlib.import_module(RECIPES[name])
