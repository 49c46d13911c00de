"""LLaVA-1.5 (Vicuna-7B v1.5) recipe.

Subgraphs: ``vision`` CLIP ViT-L/14-336, hidden_states[-2] without CLS, [1,3,336,336] ->
[1,576,1024]; ``projector`` mlp2x_gelu -> [1,576,4096]; ``embed``; ``decoder_*`` Llama layer
groups (the same graphs as MiniGPT-4's Vicuna). Prompt, preprocessing and generation defaults
follow LLaVA's v1.5 evaluation (model-architectures.md section 3): ``vicuna_v1`` conversation,
``expand2square`` + ``CLIPImageProcessor``, greedy decoding, at most 1024 new tokens
(``model_vqa``, which the LLaVA-Bench script runs with ``--temperature 0``), stop at ``</s>``.

Two image graphs rather than one fused Bridge: the [1,576,1024] boundary is exactly LLaVA's
``feature_select`` output, so verification (and Ascend's per-graph compare) localises an error
to the 0.3B-parameter tower or the projector, ATC compiles two smaller graphs, and the runtime
copies 1.2 MB (fp16) between them once per image, nothing next to the tower's compute.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vlm2om.graphs.clip_vit import ClipVisionConfig, ClipVisionTower
from vlm2om.graphs.common import cast_module, init_random_
from vlm2om.graphs.llama import LlamaConfig
from vlm2om.graphs.projector import MlpGeluProjector, MlpGeluProjectorConfig

from vlm2om.exporters.core.plan import ExportPlan
from vlm2om.exporters.core.plan import CLIP_MEAN, CLIP_STD, ReferenceModules, assemble, image_graph, reference_modules
from vlm2om.exporters.core import options
from vlm2om.exporters.core.options import Gears, resolve_gears
from vlm2om.exporters.llm.llama import random_llm
from vlm2om.exporters.core.subgraph import Subgraph, TensorDecl
from vlm2om.exporters.core.tiny_tokenizer import VOCAB_SIZE as TINY_VOCAB
from vlm2om.exporters.core.tiny_tokenizer import build_tiny_tokenizer
from vlm2om.exporters.families.llava15.options import PROMPTS, ExportOptions, LlavaParts

FAMILY = "llava15"
GENERATION = {"max_new_tokens": 1024, "do_sample": False}


def preprocess_steps(size: int, pad: bool = True) -> list[dict]:
    """LLaVA's process_images: expand2square with the mean colour (image_aspect_ratio 'pad'),
    then CLIPImageProcessor: shortest side to ``size`` bicubic, centre crop, /255, normalize."""
    fill = [int(m * 255) for m in CLIP_MEAN]  # (122, 116, 104)
    return [{"op": "rgb"}, *([{"op": "pad_to_square", "fill": fill}] if pad else []),
            {"op": "resize_shortest", "size": size, "interpolation": "bicubic"},
            {"op": "center_crop", "size": [size, size]},
            {"op": "to_float", "divisor": 255.0}, {"op": "normalize", "mean": CLIP_MEAN, "std": CLIP_STD}]


@dataclass(frozen=True)
class Preset:
    vision: ClipVisionConfig
    llama: LlamaConfig
    gears: Gears
    image_token_index: int  # the id llava-hf's processor repeats; the runtime never feeds it
    std: float = 0.02


PRESETS = {
    # LLaVA-1.5's architecture at toy width, seeded random weights. Like llava-hf, the vocabulary is
    # the tokenizer's plus 64 rows (<image> first), so logits are wider than the tokenizer.
    "tiny": Preset(ClipVisionConfig(image_size=56, patch_size=14, width=32, layers=3, heads=4, mlp_dim=64),
                   LlamaConfig(vocab_size=TINY_VOCAB + 64, hidden=64, layers=2, heads=4, kv_heads=4, ffn=128,
                               rms_eps=1e-5, max_positions=4096),
                   Gears(seq=(1, 16, 64), cache=(128, 256), layers_per_group=1), image_token_index=TINY_VOCAB),
}
# Real size: a prompt is ~40 text tokens + 576 image tokens, prefilled as 512 + 128 (or 512 + 32 +
# 32...) chunks; 1024 cache slots hold it plus ~400 new tokens, 2048 (LLaVA's model_max_length) the
# 1024-token answer cap. 4 seq x 2 cache gears = 8 decoder gears.
REAL_GEARS = Gears(seq=(1, 32, 128, 512), cache=(1024, 2048), layers_per_group=4)


def _random_parts(name: str, opts: ExportOptions, gears: Gears) -> LlavaParts:
    p = PRESETS[name]
    proj = MlpGeluProjectorConfig(p.vision.width, p.llama.hidden)
    s, dtype = opts.seed, opts.export_dtype
    td = getattr(torch, dtype)
    return LlavaParts(
        p.vision, proj, random_llm(p.llama, gears, s, dtype), build_tiny_tokenizer(), {"preset": name, "seed": s},
        lambda: cast_module(init_random_(ClipVisionTower(p.vision), s + 1, p.std), td),
        # 0.2 keeps the image embeddings at the text embeddings' scale (std ~1).
        lambda: cast_module(init_random_(MlpGeluProjector(proj), s + 3, 0.2), td),
        image_token_index=p.image_token_index)


def gear_options(opts: ExportOptions) -> Gears:
    return resolve_gears(opts, {k: p.gears for k, p in PRESETS.items()}, REAL_GEARS)


def build_parts(opts: ExportOptions) -> LlavaParts:
    """Seeded random weights for a preset, or a checkpoint folder checked key by key up front."""
    return options.build_parts(opts, PRESETS, REAL_GEARS, _random_parts, "vlm2om.exporters.families.llava15.loader")


def build_modules(opts: ExportOptions) -> ReferenceModules:
    """Every module at once: the CLIP tower and the projector chained, then the Llama side."""
    parts = build_parts(opts)
    return reference_modules([parts.build_vision, parts.build_projector], parts.llm, parts.tokenizer, parts.source)


def image_subgraphs(parts: LlavaParts, dtype: str) -> list[Subgraph]:
    v = parts.vision_cfg
    features = TensorDecl("image_features", dtype, (1, v.num_tokens, v.width))
    return [image_graph("vision", parts.build_vision,
                        TensorDecl("pixel_values", dtype, (1, 3, v.image_size, v.image_size)), features),
            image_graph("projector", parts.build_projector, features,
                        TensorDecl("image_embeds", dtype, (1, v.num_tokens, parts.llm.llama.hidden)))]


def plan(opts: ExportOptions) -> ExportPlan:
    gears = gear_options(opts)
    parts = build_parts(opts)
    v = parts.vision_cfg
    model = {"llama": vars(parts.llm.llama), "vision": vars(v), "projector": vars(parts.proj_cfg),
             "image_token_index": parts.image_token_index, "checkpoint_layout": parts.layout}
    processor = "expand2square + CLIPImageProcessor" if parts.pad_to_square else "CLIPImageProcessor"
    described = {"prompt": {**PROMPTS[opts.template], "legacy": parts.legacy}, "generation": GENERATION,
                 "preprocess": {"processor": processor, "steps": preprocess_steps(v.image_size, parts.pad_to_square)}}
    variant = parts.source.get("preset") or Path(opts.checkpoint).resolve().name
    return assemble(FAMILY, variant, opts, gears, parts.llm, image_subgraphs(parts, opts.export_dtype),
                    v.num_tokens, parts.tokenizer, parts.source, model, described)

