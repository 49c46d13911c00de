"""InternLM-XComposer2: VL-7B (``ixc2-vl``) and 4KHD-7B (``ixc2-4khd``), one family in two variants.

options (ExportOptions, HdExportOptions, the chat prompt, Ixc2Parts), checkpoint (the Hugging Face
folders' weight tables), loader (a checkpoint folder into Parts), recipe (presets, the export plan,
both variants), reference (torch). The packages ``vl`` and ``hd`` are the two registry entries: each
binds the shared modules to its variant.
"""
