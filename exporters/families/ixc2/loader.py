"""InternLM-XComposer2's graphs (VL-7B or 4KHD-7B) from a checkpoint folder (checkpoint.py).

The whole folder is checked first (every key and shape, the variant, the LoRA ranks against their
alphas, the tokenizer's chat pieces), so a bad folder fails in seconds; each graph's module is
then built on the meta device and handed its own tensors only when the export reaches its graph
(one graph's weights in memory at a time).
"""
from __future__ import annotations

from pathlib import Path

import torch

from vlm2om.graphs.clip_vit import ClipVisionTower
from vlm2om.graphs.common import cast_module

from vlm2om.exporters.core.checkpoints import assign
from vlm2om.exporters.core.options import Gears
from vlm2om.exporters.families.ixc2 import checkpoint as w
from vlm2om.exporters.families.ixc2.options import ExportOptions, Ixc2Parts
from vlm2om.exporters.llm import internlm2_weights as iw
from vlm2om.exporters.llm.internlm2 import tokenizer_entry


def load_parts(opts: ExportOptions, gears: Gears) -> Ixc2Parts:
    """Parts whose builders read one graph's tensors each, after the whole folder checked out;
    ``opts.variant`` ("vl" / "4khd", the family's) must be the folder's."""
    checkpoint, dtype = Path(opts.checkpoint), opts.export_dtype
    ck = w.open_checkpoint(checkpoint, opts.variant, opts.clip)
    ignored = w.check_checkpoint(ck)
    tokenizer = ck.tokenizer_model.read_bytes()
    specials = w.chat_ids(ck, tokenizer)
    td = getattr(torch, dtype)

    # Read at the checkpoint's dtype, range-checked, then cast: LayerNorms stay fp32 (cast_module).
    def vision():
        return cast_module(assign(lambda: ClipVisionTower(ck.vision), w.vision_state(ck).fit(td).state), td)

    def projector():
        return cast_module(assign(lambda: w.projector_module(ck), w.projector_state(ck).fit(td).state), td)

    ids, end = ck.provenance["ids"], specials[w.CHAT_PIECES[0]]
    entry = {**tokenizer_entry(end), "bos_id": ids["bos"], "eos_id": ids["eos"], "eos_ids": [ids["eos"], end]}
    llm = iw.checkpoint_internlm2(ck.open, ck.llm, iw.XCOMPOSER2, gears, dtype, entry)
    source = {"checkpoint": str(checkpoint), "layout": ck.layout, **ck.provenance, "ignored_keys": ignored,
              "specials": specials, "eos_ids": entry["eos_ids"]}
    return Ixc2Parts(ck.variant, ck.vision, ck.projector, llm, tokenizer, source, vision, projector)
