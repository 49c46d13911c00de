"""``ixc2-4khd``: InternLM-XComposer2-4KHD-7B (the family's modules with variant ``4khd``)."""
from vlm2om.exporters.core.lazy import lazy_attributes
from vlm2om.exporters.families.ixc2.hd.options import ExportOptions

# The recipe and the reference import torch: loaded when first asked for.
__getattr__ = lazy_attributes("vlm2om.exporters.families.ixc2", {
    "PRESETS": ("hd.presets", "PRESETS"), "plan": ("recipe", "plan"), "build_modules": ("recipe", "build_modules"),
    "Reference": ("reference", "Ixc2Reference")})

__all__ = ["ExportOptions", "PRESETS", "plan", "build_modules", "Reference"]
