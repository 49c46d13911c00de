"""MiniGPT-4 (Vicuna v0 7B) recipe.

Subgraphs: ``vision`` EVA-ViT-g + ln_vision [1,3,224,224] -> [1,257,1408] (for a checkpoint
``vision_0``, ``vision_1``: the 39 blocks in two graphs, chained); ``bridge`` Q-Former +
llama_proj -> [1,32,4096]; ``embed``; ``decoder_*`` Llama layer groups.
Prompt, preprocessing and generation defaults follow MiniGPT-4's demo for vicuna0
(``CONV_VISION_Vicuna0``, ``Blip2ImageEvalProcessor``, ``Chat.answer``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import torch

from vlm2om.graphs.common import cast_module, init_random_
from vlm2om.graphs.eva_vit import EvaVisionEncoder, EvaVitConfig
from vlm2om.graphs.llama import LlamaConfig
from vlm2om.graphs.projector import Bridge, LinearProjector, LinearProjectorConfig
from vlm2om.graphs.qformer import QFormer, QFormerConfig

from vlm2om.exporters.core.plan import ExportPlan
from vlm2om.exporters.core import blip2
from vlm2om.exporters.core.blip2 import slice_layers
from vlm2om.exporters.core.plan import ReferenceModules, assemble, reference_modules
from vlm2om.exporters.core import options
from vlm2om.exporters.core.options import Gears, resolve_gears
from vlm2om.exporters.llm.llama import random_llm
from vlm2om.exporters.core.subgraph import Subgraph
from vlm2om.exporters.core.tiny_tokenizer import VOCAB_SIZE as TINY_VOCAB
from vlm2om.exporters.core.tiny_tokenizer import build_tiny_tokenizer
from vlm2om.exporters.families.minigpt4.options import ExportOptions, MiniGPT4Parts

FAMILY = "minigpt4"
SYSTEM = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image "
          "once I provide it to you. Please answer my questions.")
PROMPT = {
    "template": "vicuna_v0", "kind": "fastchat_single", "system": SYSTEM, "roles": ["Human: ", "Assistant: "],
    "sep": "###", "image_message": "<Img><ImageHere></Img>", "image_message_end": "</Img>",
    "image_placeholder": "<ImageHere>", "bos": "first", "stop_strings": ["###"],
    "answer_split": "Assistant:",
}
GENERATION = {"max_new_tokens": 300, "do_sample": True, "temperature": 1.0, "top_p": 0.9,
              "repetition_penalty": 1.05}


@dataclass(frozen=True)
class Preset:
    vision: EvaVitConfig
    qformer: QFormerConfig
    llama: LlamaConfig  # vocab_size 0: take the tokenizer's
    gears: Gears
    std: float = 0.02


_TINY_VISION = EvaVitConfig(width=32, depth=2, heads=2, mlp_dim=64)
_TINY_QFORMER = QFormerConfig(hidden=32, layers=2, heads=2, ffn=64, encoder_width=32)
PRESETS = {
    # Same architecture at toy width; seeded random weights; runs end to end in seconds.
    "tiny": Preset(_TINY_VISION, _TINY_QFORMER,
                   LlamaConfig(vocab_size=0, hidden=64, layers=2, heads=4, kv_heads=4, ffn=128),
                   Gears(seq=(1, 16, 64), cache=(128, 256), layers_per_group=1)),
    # ~134M-parameter decoder (Llama-7B shape at 768 wide, 12 layers) for the decode benchmark, laid
    # out for onnxruntime on a CPU: per-layer KV, a capacity gear every 256 slots up to a 2000-token
    # prompt and its answer (a step pays for the context it holds), prompt chunks up to 512, and a
    # 16-slot gear so that a prompt's first chunk does not attend over 256 empty slots (60 gears).
    "bench": Preset(_TINY_VISION, _TINY_QFORMER,
                    LlamaConfig(vocab_size=32000, hidden=768, layers=12, heads=12, kv_heads=12, ffn=2048),
                    Gears(seq=(1, 16, 64, 128, 256, 512), cache=(16, *range(256, 2305, 256)), layers_per_group=12,
                          kv_layout="per_layer")),
}
# Two decoder layers per file and EVA in two graphs (blip2.REAL_VISION_GRAPHS): onnxruntime's CPU
# kernels verify fp16 weights through an fp32 copy, so an export's peak memory is about twice its
# largest graph (~0.9 GB fp16).
REAL_GEARS = Gears(seq=(1, 32, 128, 512), cache=(256, 512, 1024, 2048), layers_per_group=2)


def _random_parts(name: str, opts: ExportOptions, gears: Gears) -> MiniGPT4Parts:
    p = PRESETS[name]
    llama = p.llama if p.llama.vocab_size else replace(p.llama, vocab_size=TINY_VOCAB)
    proj = LinearProjectorConfig(p.qformer.hidden, llama.hidden)
    s, dtype = opts.seed, opts.export_dtype
    td = getattr(torch, dtype)

    def bridge():
        q = init_random_(QFormer(p.qformer), s + 2, p.std)
        return cast_module(Bridge(q, init_random_(LinearProjector(proj), s + 3, 0.5)), td)

    bounds = opts.vision_bounds(p.vision.depth)

    def vision(i: int):
        """Slices of one seeded encoder, so the weights do not depend on the split."""
        whole = init_random_(EvaVisionEncoder(p.vision), s + 1, p.std)
        a, b = bounds[i]
        part = whole if (a, b) == (0, p.vision.depth) else slice_layers(whole, EvaVisionEncoder(p.vision, (a, b)),
                                                                         "blocks.", a)
        return cast_module(part, td)

    return MiniGPT4Parts(
        p.vision, p.qformer, random_llm(llama, gears, s, dtype), build_tiny_tokenizer(),
        {"preset": name, "seed": s}, bounds, vision, bridge)


def gear_options(opts: ExportOptions) -> Gears:
    return resolve_gears(opts, {k: p.gears for k, p in PRESETS.items()}, REAL_GEARS)


def build_parts(opts: ExportOptions) -> MiniGPT4Parts:
    """Seeded random weights for a preset, or a checkpoint folder checked key by key up front."""
    return options.build_parts(opts, PRESETS, REAL_GEARS, _random_parts, "vlm2om.exporters.families.minigpt4.loader")


def build_modules(opts: ExportOptions) -> ReferenceModules:
    """Every module at once: the EVA slices and the bridge chained, then the Llama side."""
    parts = build_parts(opts)
    image = [partial(parts.build_vision, i) for i in range(len(parts.vision_bounds))] + [parts.build_bridge]
    return reference_modules(image, parts.llm, parts.tokenizer, parts.source)


def image_subgraphs(parts: MiniGPT4Parts, dtype: str) -> list[Subgraph]:
    v = parts.vision_cfg
    return blip2.image_subgraphs(v.width, v.num_tokens, v.image_size, parts.qformer_cfg.num_query,
                                 parts.llm.llama.hidden, parts.vision_bounds, parts.build_vision, parts.build_bridge,
                                 dtype)


def plan(opts: ExportOptions) -> ExportPlan:
    gears = gear_options(opts)
    parts = build_parts(opts)
    model = {"llama": vars(parts.llm.llama), "vision": vars(parts.vision_cfg), "qformer": vars(parts.qformer_cfg)}
    described = {"prompt": PROMPT, "generation": GENERATION,
                 "preprocess": {"processor": "Blip2ImageEvalProcessor",
                                "steps": blip2.preprocess_steps(parts.vision_cfg.image_size)}}
    return assemble(FAMILY, parts.source.get("preset") or "vicuna0-7b", opts, gears, parts.llm,
                    image_subgraphs(parts, opts.export_dtype), parts.qformer_cfg.num_query, parts.tokenizer,
                    parts.source, model, described)
