"""The options of ``ixc2-4khd`` (the CLI reads them from here without the recipe)."""
from vlm2om.exporters.families.ixc2.options import HdExportOptions as ExportOptions

__all__ = ["ExportOptions"]
