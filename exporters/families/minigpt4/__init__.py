"""MiniGPT-4 (Vicuna-7B v0): EVA-ViT-g, the BLIP-2 Q-Former and llama_proj, then Vicuna.

options (ExportOptions, MiniGPT4Parts), checkpoint (the four files' weight tables), loader (a
checkpoint folder into Parts), recipe (presets, prompt, the export plan), reference (torch).
"""
from vlm2om.exporters.families.minigpt4.options import ExportOptions
from vlm2om.exporters.families.minigpt4.recipe import PRESETS, build_modules, plan
from vlm2om.exporters.families.minigpt4.reference import MiniGPT4Reference as Reference

__all__ = ["ExportOptions", "PRESETS", "plan", "build_modules", "Reference"]
