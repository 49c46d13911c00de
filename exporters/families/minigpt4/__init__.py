"""MiniGPT-4 (Vicuna-7B v0): EVA-ViT-g, the BLIP-2 Q-Former and llama_proj, then Vicuna.

options (ExportOptions, MiniGPT4Parts), checkpoint (the four files' weight tables), loader (a
checkpoint folder into Parts), recipe (presets, prompt, the export plan), reference (torch).
"""
from vlm2om.exporters.core.lazy import lazy_attributes
from vlm2om.exporters.families.minigpt4.options import ExportOptions

# The recipe and the reference import torch: loaded when first asked for, so that the CLI can
# parse this family's options (ExportOptions) without torch.
__getattr__ = lazy_attributes(__name__, {
    "PRESETS": ("recipe", "PRESETS"), "plan": ("recipe", "plan"), "build_modules": ("recipe", "build_modules"),
    "Reference": ("reference", "MiniGPT4Reference")})

__all__ = ["ExportOptions", "PRESETS", "plan", "build_modules", "Reference"]
