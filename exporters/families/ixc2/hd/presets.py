"""The presets of ``ixc2-4khd``."""
from vlm2om.exporters.families.ixc2.recipe import PRESETS as _ALL

PRESETS = _ALL["4khd"]
