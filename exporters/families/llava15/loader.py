"""LLaVA-1.5's graphs from a checkpoint folder in either layout (checkpoint.py): the whole folder
is checked key by key first, then each graph's module reads only its own tensors when built."""
from __future__ import annotations

from pathlib import Path

import torch

from vlm2om.graphs.clip_vit import ClipVisionTower
from vlm2om.graphs.common import cast_module
from vlm2om.graphs.projector import MlpGeluProjector

from vlm2om.exporters.core.options import Gears

from vlm2om.exporters.core.checkpoints import assign

from vlm2om.exporters.llm.llama import checkpoint_llm
from vlm2om.exporters.families.llava15.checkpoint import (check_checkpoint, open_checkpoint, projector_state,
                                                          vision_state)
from vlm2om.exporters.families.llava15.options import ExportOptions, LlavaParts


def load_parts(opts: ExportOptions, gears: Gears) -> LlavaParts:
    """Parts whose builders read one graph's tensors each, after the whole folder checked out."""
    checkpoint, dtype = Path(opts.checkpoint), opts.export_dtype
    ck = open_checkpoint(checkpoint)
    ignored = check_checkpoint(ck)
    td = getattr(torch, dtype)

    # Read at the checkpoint's dtype, then cast: the tower's LayerNorms stay fp32 (cast_module).
    def vision():
        return cast_module(assign(lambda: ClipVisionTower(ck.vision), vision_state(ck).fit(td).state), td)

    def projector():
        return cast_module(assign(lambda: MlpGeluProjector(ck.projector), projector_state(ck).fit(td).state), td)

    llm = checkpoint_llm(ck.root, ck.llama, ck.llm_keys, gears, dtype)
    source = {"checkpoint": str(checkpoint), "layout": ck.layout, "ignored_keys": ignored}
    return LlavaParts(ck.vision, ck.projector, llm, ck.tokenizer_model.read_bytes(), source, vision, projector,
                      ck.pad_to_square, ck.legacy, ck.image_token_index, ck.layout)
