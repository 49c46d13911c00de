"""VisualGLM-6B recipe: the BLIP-2 image encoder as SwissArmyTransformer builds it, then ChatGLM-6B.

Subgraphs: ``vision`` SAT EVA-ViT-g + ln_vision [1,3,224,224] -> [1,257,1408] (for a checkpoint
``vision_0``, ``vision_1``: the 39 layers in two graphs, chained); ``bridge`` SAT Q-Former +
glm_proj -> [1,32,4096]; ``embed``; ``decoder_*`` ChatGLM layer groups (exporters/llm/chatglm.py).
The seed exports only the image encoder; here the whole model is graphs.

Prompt, preprocessing and generation follow VisualGLM's chat (SAT ``model/chat.py``):
``BlipImageEvalProcessor(224)``, ``<img></img>问：{q}\\n答：`` (or ``Q:``/``A:``), ``[gMASK]<sop>``
appended, sampling with top_p 0.7, top_k 30, temperature 0.95, repetition penalty 1.2 up to
``max_length`` 1024 positions, stop at ``<eop>``, the invalid-score guard of ChatGLM's ``chat``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from vlm2om.graphs.chatglm import ChatGLMConfig
from vlm2om.graphs.common import cast_module, init_random_
from vlm2om.graphs.eva_vit import EvaVitConfig
from vlm2om.graphs.projector import Bridge, LinearProjector, LinearProjectorConfig
from vlm2om.graphs.qformer import QFormerConfig
from vlm2om.graphs.sat_qformer import SatQFormer
from vlm2om.graphs.sat_vit import SatEvaVisionEncoder

from vlm2om.exporters.core import blip2, options
from vlm2om.exporters.core.options import Gears, resolve_gears
from vlm2om.exporters.core.plan import ExportPlan, ReferenceModules, assemble, reference_modules
from vlm2om.exporters.core.tiny_chatglm_tokenizer import SP_SIZE, build_tiny_chatglm_tokenizer, special_ids
from vlm2om.exporters.llm.chatglm import random_llm, tokenizer_entry
from vlm2om.exporters.families.visualglm.options import PROMPTS, ExportOptions, VisualGLMParts

FAMILY = "visualglm"
# ChatGLM's InvalidScoreLogitsProcessor: scores with a NaN or inf become 0 with 5e4 at id 5.
INVALID_SCORE_TOKEN = 5
GENERATION = {"max_new_tokens": 1024, "max_length": 1024, "do_sample": True, "temperature": 0.95, "top_p": 0.7,
              "top_k": 30, "repetition_penalty": 1.2, "invalid_score_token": INVALID_SCORE_TOKEN}


@dataclass(frozen=True)
class Preset:
    vision: EvaVitConfig
    qformer: QFormerConfig
    chatglm: ChatGLMConfig
    gears: Gears
    std: float = 0.02


PRESETS = {
    # VisualGLM's architecture at toy width with seeded random weights and the tiny ChatGLM tokenizer
    # (the real layout's special pieces). A prefix-LM context is prefilled in one chunk: seq gears up
    # to 256 hold a two-turn prompt of the tiny tokenizer (32 image positions and ~100 text ids).
    "tiny": Preset(EvaVitConfig(width=32, depth=2, heads=2, mlp_dim=64),
                   QFormerConfig(hidden=32, layers=2, heads=2, ffn=64, encoder_width=32),
                   ChatGLMConfig(vocab_size=SP_SIZE, hidden=64, layers=2, heads=4, ffn=128),
                   Gears(seq=(1, 64, 256), cache=(256, 512), layers_per_group=1)),
}
# Real size: a context (its 32 image positions, the turns so far, [gMASK] <sop>) is prefilled in one
# chunk, so the seq gears reach 1024 positions, the cache gears VisualGLM's max_length 1024 and
# ChatGLM's 2048 positions; 6 x 4 = 24 gears per decoder graph. Two GLM layers per file (~0.8 GB fp16),
# the cache stacked per file (four dynamic dims per gear, what every CANN release's ATC compiles).
REAL_GEARS = Gears(seq=(1, 64, 128, 256, 512, 1024), cache=(256, 512, 1024, 2048), layers_per_group=2)


def _random_parts(name: str, opts: ExportOptions, gears: Gears) -> VisualGLMParts:
    p = PRESETS[name]
    proj = LinearProjectorConfig(p.qformer.hidden, p.chatglm.hidden)
    s, dtype = opts.seed, opts.export_dtype
    td = getattr(torch, dtype)
    bounds = opts.vision_bounds(p.vision.depth)

    def vision(i: int):
        """Slices of one seeded encoder, so the weights do not depend on the split."""
        whole = init_random_(SatEvaVisionEncoder(p.vision), s + 1, p.std)
        a, b = bounds[i]
        part = whole if (a, b) == (0, p.vision.depth) else blip2.slice_layers(
            whole, SatEvaVisionEncoder(p.vision, (a, b)), "layers.", a)
        return cast_module(part, td)

    def bridge():
        q = init_random_(SatQFormer(p.qformer), s + 2, p.std)
        return cast_module(Bridge(q, init_random_(LinearProjector(proj), s + 3, 0.5)), td)

    ids = special_ids(0)
    llm = random_llm(p.chatglm, gears, s, dtype, tokenizer_entry(ids["<sop>"], ids["<eop>"], 0))
    return VisualGLMParts(p.vision, p.qformer, llm, build_tiny_chatglm_tokenizer(), {"preset": name, "seed": s},
                          bounds, vision, bridge)


def gear_options(opts: ExportOptions) -> Gears:
    return resolve_gears(opts, {k: p.gears for k, p in PRESETS.items()}, REAL_GEARS)


def build_parts(opts: ExportOptions) -> VisualGLMParts:
    """Seeded random weights for a preset, or a checkpoint checked key by key up front."""
    return options.build_parts(opts, PRESETS, REAL_GEARS, _random_parts, "vlm2om.exporters.families.visualglm.loader")


def build_modules(opts: ExportOptions) -> ReferenceModules:
    """Every module at once: the EVA slices and the bridge chained, then the ChatGLM side."""
    parts = build_parts(opts)
    image = [partial(parts.build_vision, i) for i in range(len(parts.vision_bounds))] + [parts.build_bridge]
    return reference_modules(image, parts.llm, parts.tokenizer, parts.source)


def plan(opts: ExportOptions) -> ExportPlan:
    gears = gear_options(opts)
    parts = build_parts(opts)
    v, q = parts.vision_cfg, parts.qformer_cfg
    model = {"chatglm": vars(parts.llm.llama), "vision": vars(v), "qformer": vars(q),
             "checkpoint_layout": parts.source.get("layout", "preset")}
    described = {"prompt": PROMPTS[opts.language], "generation": GENERATION,
                 "preprocess": {"processor": "BlipImageEvalProcessor", "steps": blip2.preprocess_steps(v.image_size)}}
    images = blip2.image_subgraphs(v.width, v.num_tokens, v.image_size, q.num_query, parts.llm.llama.hidden,
                                   parts.vision_bounds, parts.build_vision, parts.build_bridge, opts.export_dtype)
    variant = parts.source.get("preset") or Path(opts.checkpoint).resolve().name
    return assemble(FAMILY, variant, opts, gears, parts.llm, images, q.num_query, parts.tokenizer, parts.source,
                    model, described)
