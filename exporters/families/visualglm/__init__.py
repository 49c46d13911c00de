"""VisualGLM-6B: SwissArmyTransformer's EVA-ViT-g and BLIP-2 Q-Former, glm_proj, then ChatGLM-6B.

options (ExportOptions, VisualGLMParts, the two prompt languages), checkpoint (the Hugging Face and
SAT layouts' weight tables), loader (a checkpoint into Parts), recipe (presets, prompt, the export
plan), reference (torch).
"""
from vlm2om.exporters.core.lazy import lazy_attributes
from vlm2om.exporters.families.visualglm.options import ExportOptions

# The recipe and the reference import torch: loaded when first asked for, so that the CLI can
# parse this family's options (ExportOptions) without torch.
__getattr__ = lazy_attributes(__name__, {
    "PRESETS": ("recipe", "PRESETS"), "plan": ("recipe", "plan"), "build_modules": ("recipe", "build_modules"),
    "Reference": ("reference", "VisualGLMReference")})

__all__ = ["ExportOptions", "PRESETS", "plan", "build_modules", "Reference"]
