"""MiniGPT-4's graphs from a real checkpoint folder (layout: checkpoint.py).

Every key and shape of every file is checked before any export work starts, so a bad
folder fails in seconds, not after an hour of exporting. Each module is then built on the
meta device and handed its checkpoint tensors only when the export reaches its graph.
"""
from __future__ import annotations

from pathlib import Path

import torch

from vlm2om.graphs.common import cast_module
from vlm2om.graphs.eva_vit import EvaVisionEncoder, EvaVitConfig
from vlm2om.graphs.projector import Bridge, LinearProjector, LinearProjectorConfig
from vlm2om.graphs.qformer import QFormer, QFormerConfig

from vlm2om.exporters.core.checkpoints import assign, check_plans
from vlm2om.exporters.core.options import Gears
from vlm2om.exporters.llm.llama import checkpoint_llm
from vlm2om.exporters.families.minigpt4 import checkpoint as w
from vlm2om.exporters.families.minigpt4.options import ExportOptions, MiniGPT4Parts
from vlm2om.exporters.llm import llama_weights as lw


def load_parts(opts: ExportOptions, gears: Gears) -> MiniGPT4Parts:
    """Parts whose builders read one graph's tensors each, after the whole folder checked out."""
    checkpoint, dtype = Path(opts.checkpoint), opts.export_dtype
    files = w.find_files(checkpoint)
    llama = lw.read_llama_config(files.llm_dir)
    vcfg = opts.vision or EvaVitConfig()
    qcfg = opts.qformer or QFormerConfig(encoder_width=vcfg.width)
    pcfg = LinearProjectorConfig(qcfg.hidden, llama.hidden)
    td = getattr(torch, dtype)
    vplans, qplans, pplans = w.vision_plans(files, vcfg), w.qformer_plans(files, qcfg), w.projector_plans(files, pcfg)
    plans = [*vplans, *qplans, *pplans]
    origin = ("vlm2om's sizes of MiniGPT-4's EVA-ViT-g and Q-Former; another size needs "
              "ExportOptions(vision=..., qformer=...) from Python" if opts.vision is None and opts.qformer is None
              else "the vision and qformer options")
    check_plans(plans, "the MiniGPT-4 image side", lambda: w.image_size_hints(
        vplans[0].source, qplans[0].source, pplans[0].source, vcfg, qcfg, pcfg, origin))
    ignored = w.check_llm_keys(files, llama).ignored_lines()
    ignored += [f"{p.source.name}: {k} ({why})" for p in plans for k, why in p.ignored]
    del plans, vplans, qplans, pplans  # drop the file handles; each build reopens only what it reads

    bounds = opts.vision_bounds(vcfg.depth)

    # The image side is read at the checkpoint's own dtype: its LayerNorms stay fp32 (cast_module).
    def build_vision(i: int):
        blocks = bounds[i]
        return cast_module(assign(lambda: EvaVisionEncoder(vcfg, blocks),
                                  w.vision_state(files, vcfg, blocks=blocks).fit(td).state), td)

    def build_bridge():
        q = assign(lambda: QFormer(qcfg), w.qformer_state(files, qcfg).fit(td).state)
        proj = assign(lambda: LinearProjector(pcfg), w.projector_state(files, pcfg).fit(td).state)
        return cast_module(Bridge(q, proj), td)

    llm = checkpoint_llm(files.llm_dir, llama, lw.vicuna_keys(files.llm_dir), gears, dtype)
    return MiniGPT4Parts(vcfg, qcfg, llm, files.tokenizer_model.read_bytes(),
                         {"checkpoint": str(checkpoint), "ignored_keys": ignored}, bounds, build_vision,
                         build_bridge)
