"""VisualGLM-6B's graphs from a real checkpoint, in either published layout (checkpoint.py).

Every key and shape of the whole state dict, and the tokenizer's ids, are checked before any
tensor data is read, so a bad checkpoint fails in seconds; each module is then built on the meta
device and handed its own tensors only when the export reaches its graph (one graph's weights in
memory at a time).
"""
from __future__ import annotations

from pathlib import Path

import torch

from vlm2om.graphs.common import cast_module
from vlm2om.graphs.eva_vit import EvaVitConfig
from vlm2om.graphs.projector import Bridge, LinearProjector, LinearProjectorConfig
from vlm2om.graphs.qformer import QFormerConfig
from vlm2om.graphs.sat_qformer import SatQFormer
from vlm2om.graphs.sat_vit import SatEvaVisionEncoder

from vlm2om.exporters.core.checkpoints import assign, check_plans, coverage_plan, load_plans
from vlm2om.exporters.core.options import Gears
from vlm2om.exporters.families.visualglm import checkpoint as w
from vlm2om.exporters.families.visualglm.options import ExportOptions, VisualGLMParts
from vlm2om.exporters.llm import chatglm_weights as gw
from vlm2om.exporters.llm.chatglm import tokenizer_entry


def _origins(opts: ExportOptions, files: w.VisualGLMFiles, conf: w.VisualGLMConfig) -> dict[str, str]:
    """Where each size came from, for the error that says which sizes disagree."""
    args = ("eva_config", "qformer_config") if files.layout == "hf" else ("eva_args", "qformer_args")
    out = {"glm": f"read from {files.config}"}
    for name, option, found, arg in (("vision", opts.vision, conf.vision, args[0]),
                                     ("qformer", opts.qformer, conf.qformer, args[1])):
        out[name] = (f"the {name} option" if option is not None else f"{arg} in {files.config}" if found
                     else f"vlm2om's defaults ({files.config} has no {arg}); another size needs "
                          f"ExportOptions({name}=...) from Python")
    return out


def load_parts(opts: ExportOptions, gears: Gears) -> VisualGLMParts:
    """Parts whose builders read one graph's tensors each, after the whole checkpoint checked out."""
    files = w.find_files(Path(opts.checkpoint), opts.tokenizer)
    conf = w.read_config(files)
    glm, keys, dtype = conf.glm, files.glm_keys, opts.export_dtype
    vcfg = opts.vision or conf.vision or EvaVitConfig()
    qcfg = opts.qformer or conf.qformer or QFormerConfig(encoder_width=vcfg.width)
    pcfg = LinearProjectorConfig(qcfg.hidden, glm.hidden)  # BLIP2.glm_proj: Q-Former -> GLM width
    td = getattr(torch, dtype)

    source = files.open()
    plans = [gw.llm_plan(source, glm, keys, check_unmapped=False), w.vision_plan(source, files, vcfg),
             w.qformer_plan(source, files, qcfg), w.projector_plan(source, files, pcfg)]
    cover = coverage_plan(source, plans, keys.ignore)  # every other key is an error
    check_plans([*plans, cover], f"the VisualGLM-6B checkpoint ({files.layout} layout)",
                w.size_hints(source, files, vcfg, qcfg, pcfg, glm, _origins(opts, files, conf)))
    ignored = [f"{source.name}: {k} ({why})" for k, why in cover.ignored]
    del source, plans, cover  # drop the handles; each build reopens only what it reads

    tokenizer = files.tokenizer.read_bytes()
    offset, origin = w.id_offset(files)
    bos, eos = w.check_tokenizer(files, tokenizer, conf.ids, offset, origin)
    bounds = opts.vision_bounds(vcfg.depth)

    # The image side is read at the checkpoint's own dtype: its LayerNorms stay fp32 (cast_module).
    def build_vision(i: int):
        blocks = bounds[i]
        plan = w.vision_plan(files.open(), files, vcfg, blocks)
        state = load_plans([plan], None, f"VisualGLM EVA layers [{blocks[0]}, {blocks[1]})").fit(td).state
        return cast_module(assign(lambda: SatEvaVisionEncoder(vcfg, blocks), state), td)

    def build_bridge():
        source = files.open()
        q = load_plans([w.qformer_plan(source, files, qcfg)], None, "VisualGLM Q-Former").fit(td).state
        p = load_plans([w.projector_plan(source, files, pcfg)], None, "VisualGLM glm_proj").fit(td).state
        return cast_module(Bridge(assign(lambda: SatQFormer(qcfg), q), assign(lambda: LinearProjector(pcfg), p)), td)

    llm = gw.checkpoint_chatglm(files.open, glm, keys, gears, dtype, tokenizer_entry(bos, eos, offset))
    source_info = {"checkpoint": str(opts.checkpoint), "layout": files.layout, "ignored_keys": ignored}
    return VisualGLMParts(vcfg, qcfg, llm, tokenizer, source_info, bounds, build_vision, build_bridge)
