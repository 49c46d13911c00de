"""The presets of ``ixc2-vl``."""
from vlm2om.exporters.families.ixc2.recipe import PRESETS as _ALL

PRESETS = _ALL["vl"]
