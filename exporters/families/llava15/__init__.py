"""LLaVA-1.5 (Vicuna-7B v1.5): CLIP ViT-L/14-336 and the mlp2x_gelu projector, then Vicuna.

options (ExportOptions, prompt templates, LlavaParts), checkpoint (both published layouts'
weight tables), loader (a checkpoint folder into Parts), recipe (presets, the export plan),
reference (torch, with transformers' processor and tokenizer).
"""
from vlm2om.exporters.families.llava15.options import ExportOptions
from vlm2om.exporters.families.llava15.recipe import PRESETS, build_modules, plan
from vlm2om.exporters.families.llava15.reference import LlavaReference as Reference

__all__ = ["ExportOptions", "PRESETS", "plan", "build_modules", "Reference"]
