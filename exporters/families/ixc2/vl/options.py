"""The options of ``ixc2-vl`` (the CLI reads them from here without the recipe)."""
from vlm2om.exporters.families.ixc2.options import ExportOptions

__all__ = ["ExportOptions"]
