"""InternLM-XComposer2 recipe, both variants: the CLIP tower, its projector, then InternLM2 with
Partial LoRA (exporters/llm/internlm2.py).

VL-7B subgraphs: ``vision`` CLIP ViT-L/14 at 490 px (1226 positions, the last layer's output
before ``post_layernorm``, CLS dropped) [1,3,490,490] -> [1,1225,1024]; ``projector``
``vision_proj`` -> [1,1225,4096]; ``embed``; ``decoder_*``. Preprocessing: Resize((490,490),
bicubic), ToTensor, Normalize(CLIP).

4KHD-7B: the image becomes a global view and h x w crops of 336 px (HD_transform, hd_num crops at
most), in batches of 1, 2, 4 or 8 views through ``vision`` ([B,3,336,336] -> [B,576,1024]) and
``projector`` (graphs/ixc2_vision.py: the 2x2 merge, the separators, ``vision_proj`` -> [B,146,4096]); the
runtime lays the views out (``pipeline.image_assembly``, kind ``hd_grid``), so the image has
(h*w+1)*144 + 1 + (h+1)*12 rows, a count that varies with the image (``image_tokens`` null).

Prompt and generation follow the original's ``chat``: the ``[UNUSED_TOKEN_146]``/``[UNUSED_TOKEN_145]``
format with the meta instruction, a BOS on every text part, sampling with temperature 1.0, top_p 0.8,
repetition penalty 1.005, at most 1024 new tokens, stop at ``</s>`` or ``[UNUSED_TOKEN_145]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vlm2om.graphs.clip_vit import ClipVisionConfig, ClipVisionTower
from vlm2om.graphs.common import cast_module, init_random_
from vlm2om.graphs.internlm2 import InternLM2Config, lora_table
from vlm2om.graphs.ixc2_vision import HdViewConfig, HdViewProjector
from vlm2om.graphs.projector import MlpGeluProjector, MlpGeluProjectorConfig

from vlm2om.exporters.core import options
from vlm2om.exporters.core.options import Gears, resolve_gears
from vlm2om.exporters.core.plan import (CLIP_MEAN, CLIP_STD, ExportPlan, ReferenceModules, assemble, image_graph,
                                        reference_modules)
from vlm2om.exporters.core.subgraph import Subgraph, TensorDecl
from vlm2om.exporters.core.tiny_internlm2_tokenizer import VOCAB_SIZE as TINY_VOCAB
from vlm2om.exporters.core.tiny_internlm2_tokenizer import build_tiny_internlm2_tokenizer, chat_ids
from vlm2om.exporters.llm.internlm2 import random_llm, tokenizer_entry
from vlm2om.exporters.families.ixc2.options import BEGIN, END, ExportOptions, Ixc2Parts

FAMILIES = {"vl": "ixc2-vl", "4khd": "ixc2-4khd"}
GENERATION = {"max_new_tokens": 1024, "do_sample": True, "temperature": 1.0, "top_p": 0.8,
              "repetition_penalty": 1.005}
WHITE = [255, 255, 255]


@dataclass(frozen=True)
class Preset:
    vision: ClipVisionConfig
    internlm2: InternLM2Config
    gears: Gears
    std: float = 0.02


_TINY_LLM = dict(vocab_size=TINY_VOCAB, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, max_positions=4096)
# The tiny tokenizer spends ~400 ids on the meta instruction (its Chinese is byte pieces), so the tiny
# caches hold 512 and 1024 positions.
_TINY_GEARS = Gears(seq=(1, 32, 128), cache=(512, 1024), layers_per_group=1)
PRESETS = {
    "vl": {"tiny": Preset(ClipVisionConfig(image_size=70, patch_size=14, width=32, layers=2, heads=4, mlp_dim=64,
                                           select_layer=-1),
                          InternLM2Config(**_TINY_LLM, lora=lora_table((4, 4))), _TINY_GEARS)},
    # 56 px views: 4x4 patches, merged to 2x2 tokens; wqkv's own rank and alpha as 4KHD has them.
    "4khd": {"tiny": Preset(ClipVisionConfig(image_size=56, patch_size=14, width=32, layers=2, heads=4, mlp_dim=64,
                                             select_layer=-1),
                            InternLM2Config(**_TINY_LLM, lora=lora_table((4, 4), wqkv=(2, 4))), _TINY_GEARS)},
}
# Real size. VL: ~1225 image + ~150 text positions, prefilled in chunks of up to 1024; the caches
# hold 2048 and 4096 (the original's max_length). 4KHD at hd_num 25: ~3817 image positions (a square
# image) and at 55 up to 8209 (11x5 crops), plus text and the 1024-token answer: caches up to 10240,
# chunks up to 2048. Two PLoRA layers per file (~0.95 GB fp16); 20 gears per decoder graph at most.
REAL_GEARS = {"vl": Gears(seq=(1, 64, 256, 1024), cache=(2048, 4096), layers_per_group=2),
              "4khd": Gears(seq=(1, 64, 256, 1024, 2048), cache=(1024, 4096, 8192, 10240), layers_per_group=2)}


def preprocess_steps(variant: str, size: int, hd_num: int | None) -> list[dict]:
    """VL: Resize((S, S), bicubic), ToTensor, Normalize. 4KHD: HD_transform (white padding to
    multiples of the view size), ToTensor, Normalize; the views are cut by the runtime."""
    shape = ([{"op": "resize", "size": [size, size], "interpolation": "bicubic"}] if variant == "vl" else
             [{"op": "hd_transform", "hd_num": hd_num, "size": size, "fill": WHITE}])
    return [{"op": "rgb"}, *shape, {"op": "to_float", "divisor": 255.0},
            {"op": "normalize", "mean": CLIP_MEAN, "std": CLIP_STD}]


def image_assembly(view: HdViewConfig, size: int) -> dict:
    """How the runtime lays out 4KHD's views (runtime/image_assembly.py)."""
    t = view.merged
    return {"kind": "hd_grid", "view_size": size, "global_resize": "bicubic", "tokens_per_side": t,
            "global_separator_row": t * t, "row_separator_row": t * t + 1}


def _random_parts(variant: str):
    def make(name: str, opts: ExportOptions, gears: Gears) -> Ixc2Parts:
        p = PRESETS[variant][name]
        s, td = opts.seed, getattr(torch, opts.export_dtype)
        hidden = p.internlm2.hidden
        proj_cfg = (MlpGeluProjectorConfig(p.vision.width, hidden) if variant == "vl" else
                    HdViewConfig(p.vision.grid, p.vision.width, hidden))
        proj_cls = MlpGeluProjector if variant == "vl" else HdViewProjector
        ids = chat_ids()
        llm = random_llm(p.internlm2, gears, s, opts.export_dtype, tokenizer_entry(ids[END]))
        return Ixc2Parts(
            variant, p.vision, proj_cfg, llm, build_tiny_internlm2_tokenizer(),
            {"preset": name, "seed": s, "specials": ids},
            lambda: cast_module(init_random_(ClipVisionTower(p.vision), s + 1, p.std), td),
            # 0.2 keeps the image embeddings at the text embeddings' scale.
            lambda: cast_module(init_random_(proj_cls(proj_cfg), s + 3, 0.2), td))
    return make


def gear_options(opts: ExportOptions) -> Gears:
    v = opts.variant
    return resolve_gears(opts, {k: p.gears for k, p in PRESETS[v].items()}, REAL_GEARS[v])


def build_parts(opts: ExportOptions) -> Ixc2Parts:
    """Seeded random weights for a preset, or a checkpoint folder checked key by key up front."""
    v = opts.variant
    return options.build_parts(opts, PRESETS[v], REAL_GEARS[v], _random_parts(v),
                               "vlm2om.exporters.families.ixc2.loader")


def build_modules(opts: ExportOptions) -> ReferenceModules:
    """Every module at once: the tower and the projector chained (one view), then InternLM2."""
    parts = build_parts(opts)
    return reference_modules([parts.build_vision, parts.build_projector], parts.llm, parts.tokenizer, parts.source)


# 4KHD's views go through the tower and the view projector in batches of these many (the runtime
# splits an image's 1 + h*w views into them without padding: 26 views at hd_num 25 are 8+8+8+2).
VIEW_BATCHES = (1, 2, 4, 8)


def image_subgraphs(parts: Ixc2Parts, dtype: str) -> list[Subgraph]:
    v, hidden = parts.vision_cfg, parts.llm.llama.hidden
    hd = parts.variant == "4khd"
    b, batches = ("batch", VIEW_BATCHES) if hd else (1, None)
    features = TensorDecl("image_features", dtype, (b, v.num_tokens, v.width))
    out = (TensorDecl("view_embeds", dtype, (b, parts.proj_cfg.rows, hidden)) if hd else
           TensorDecl("image_embeds", dtype, (1, v.num_tokens, hidden)))
    return [image_graph("vision", parts.build_vision,
                        TensorDecl("pixel_values", dtype, (b, 3, v.image_size, v.image_size)), features, batches),
            image_graph("projector", parts.build_projector, features, out, batches)]


def plan(opts: ExportOptions) -> ExportPlan:
    gears = gear_options(opts)
    parts = build_parts(opts)
    v, variant = parts.vision_cfg, parts.variant
    specials = {p: parts.source["specials"][p] for p in (BEGIN, END)}
    hd_num = getattr(opts, "hd_num", None)
    model = {"internlm2": {**vars(parts.llm.llama), "lora": [list(x) for x in parts.llm.llama.lora]},
             "vision": vars(v), "projector": vars(parts.proj_cfg), "variant": variant,
             "checkpoint_layout": parts.source.get("layout", "preset")}
    processor = "Resize + Normalize" if variant == "vl" else "HD_transform + Normalize"
    described = {"prompt": opts.prompt(specials), "generation": GENERATION,
                 "preprocess": {"processor": processor, "steps": preprocess_steps(variant, v.image_size, hd_num)}}
    p = assemble(FAMILIES[variant], parts.source.get("preset") or Path(opts.checkpoint).resolve().name, opts, gears,
                 parts.llm, image_subgraphs(parts, opts.export_dtype), v.num_tokens if variant == "vl" else None,
                 parts.tokenizer, parts.source, model, described)
    if variant == "4khd":
        p.manifest["pipeline"]["image_assembly"] = image_assembly(parts.proj_cfg, v.image_size)
    return p
