"""Build MiniGPT-4's torch modules from a real checkpoint folder (layout: minigpt4_weights).

Modules are created on the meta device and the checkpoint tensors are assigned to them, so
no random initialisation is allocated next to the real weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

from graphs.eva_vit import EvaVisionEncoder, EvaVitConfig
from graphs.llama import LlamaDecoderGroup, LlamaEmbedding
from graphs.projector import Bridge, LinearProjector, LinearProjectorConfig
from graphs.qformer import QFormer, QFormerConfig

from . import minigpt4_weights as w
from .llm import group_bounds


def _assign(build, report):
    with torch.device("meta"):
        module = build()
    module.load_state_dict(report.state, strict=True, assign=True)
    return module


def load_modules(checkpoint: Path, dtype: str, rope_length: int, per_group: int,
                 vision: EvaVitConfig | None = None, qformer: QFormerConfig | None = None):
    from .minigpt4 import MiniGPT4Modules

    files = w.find_files(checkpoint)
    llama = w.read_llama_config(files.llm_dir)
    vcfg = vision or EvaVitConfig()
    qcfg = qformer or QFormerConfig(encoder_width=vcfg.width)
    pcfg = LinearProjectorConfig(qcfg.hidden, llama.hidden)
    td = getattr(torch, dtype)
    ignored = w.check_llm_keys(files, llama).ignored_lines()
    reports = {"vision": w.vision_state(files, vcfg, td), "qformer": w.qformer_state(files, qcfg, td),
               "projector": w.projector_state(files, pcfg, td), "embed": w.embed_state(files, llama, td)}
    for r in reports.values():
        ignored += r.ignored_lines()
    vision_m = _assign(lambda: EvaVisionEncoder(vcfg), reports["vision"])
    bridge = Bridge(_assign(lambda: QFormer(qcfg), reports["qformer"]),
                    _assign(lambda: LinearProjector(pcfg), reports["projector"]))
    embed = _assign(lambda: LlamaEmbedding(llama), reports["embed"])
    groups = []
    for a, b in group_bounds(llama.layers, per_group):
        g = _assign(lambda: LlamaDecoderGroup(llama, a, b, rope_length),
                    w.decoder_group_state(files, llama, a, b, td))
        g.init_buffers(rope_length)
        groups.append(g)
    return MiniGPT4Modules(vision_m, bridge, embed, groups, llama, files.tokenizer_model.read_bytes(),
                           vcfg.image_size, {"checkpoint": str(checkpoint), "ignored_keys": ignored})
