"""LLaVA-1.5 (Vicuna-7B v1.5): CLIP ViT-L/14-336 and the mlp2x_gelu projector, then Vicuna.

options (ExportOptions, prompt templates, LlavaParts), checkpoint (both published layouts'
weight tables), loader (a checkpoint folder into Parts), recipe (presets, the export plan),
reference (torch, with transformers' processor and tokenizer).
"""
from vlm2om.exporters.core.lazy import lazy_attributes
from vlm2om.exporters.families.llava15.options import ExportOptions

# The recipe and the reference import torch: loaded when first asked for, so that the CLI can
# parse this family's options (ExportOptions) without torch.
__getattr__ = lazy_attributes(__name__, {
    "PRESETS": ("recipe", "PRESETS"), "plan": ("recipe", "plan"), "build_modules": ("recipe", "build_modules"),
    "Reference": ("reference", "LlavaReference")})

__all__ = ["ExportOptions", "PRESETS", "plan", "build_modules", "Reference"]
