"""MiniGPT-4 (Vicuna v0 7B) recipe.

Subgraphs: ``vision`` EVA-ViT-g + ln_vision [1,3,224,224] -> [1,257,1408]; ``bridge``
Q-Former + llama_proj -> [1,32,4096]; ``embed``; ``decoder_*`` Llama layer groups.
Prompt, preprocessing and generation defaults follow MiniGPT-4's demo for vicuna0
(``CONV_VISION_Vicuna0``, ``Blip2ImageEvalProcessor``, ``Chat.answer``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from graphs.common import init_random_
from graphs.eva_vit import EvaVisionEncoder, EvaVitConfig
from graphs.llama import LlamaConfig, LlamaDecoderGroup, LlamaEmbedding
from graphs.projector import Bridge, LinearProjector, LinearProjectorConfig
from graphs.qformer import QFormer, QFormerConfig
from runtime.errors import InputError

from .export import ExportPlan
from .llm import embed_subgraph, group_bounds, group_subgraph, llm_manifest
from .subgraph import Subgraph, TensorDecl
from .tiny_tokenizer import build_tiny_tokenizer

FAMILY = "minigpt4"
SYSTEM = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image "
          "once I provide it to you. Please answer my questions.")
PROMPT = {
    "template": "vicuna_v0", "style": "single", "system": SYSTEM, "roles": ["Human: ", "Assistant: "],
    "sep": "###", "image_message": "<Img><ImageHere></Img>", "image_message_end": "</Img>",
    "image_placeholder": "<ImageHere>", "bos": "first", "stop_strings": ["###"],
    "answer_split": "Assistant:",
}
GENERATION = {"max_new_tokens": 300, "do_sample": True, "temperature": 1.0, "top_p": 0.9,
              "repetition_penalty": 1.05}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def preprocess_steps(size: int) -> list[dict]:
    """Blip2ImageEvalProcessor: Resize((S, S), BICUBIC) -> ToTensor -> Normalize(CLIP)."""
    return [{"op": "rgb"}, {"op": "resize", "size": [size, size], "interpolation": "bicubic"},
            {"op": "to_float", "divisor": 255.0}, {"op": "normalize", "mean": CLIP_MEAN, "std": CLIP_STD}]


@dataclass(frozen=True)
class Preset:
    vision: EvaVitConfig
    qformer: QFormerConfig
    llama: LlamaConfig  # vocab_size 0: take the tokenizer's
    seq_gears: tuple[int, ...]
    cache_gears: tuple[int, ...]
    layers_per_group: int
    std: float = 0.02


_TINY_VISION = EvaVitConfig(width=32, depth=2, heads=2, mlp_dim=64)
_TINY_QFORMER = QFormerConfig(hidden=32, layers=2, heads=2, ffn=64, encoder_width=32)
PRESETS = {
    # Same architecture at toy width; seeded random weights; runs end to end in seconds.
    "tiny": Preset(_TINY_VISION, _TINY_QFORMER,
                   LlamaConfig(vocab_size=0, hidden=64, layers=2, heads=4, kv_heads=4, ffn=128),
                   seq_gears=(1, 16, 64), cache_gears=(128, 256), layers_per_group=1),
    # ~134M-parameter decoder (Llama-7B shape at 768 wide, 12 layers) for the decode benchmark.
    "bench": Preset(_TINY_VISION, _TINY_QFORMER,
                    LlamaConfig(vocab_size=32000, hidden=768, layers=12, heads=12, kv_heads=12, ffn=2048),
                    seq_gears=(1, 16, 64, 256), cache_gears=(256, 512), layers_per_group=12),
}
REAL_GEARS = {"seq_gears": (1, 32, 128, 512), "cache_gears": (256, 512, 1024, 2048), "layers_per_group": 4}


@dataclass(frozen=True)
class ExportOptions:
    preset: str | None = "tiny"
    checkpoint: Path | None = None
    dtype: str = "float32"
    seq_gears: tuple[int, ...] | None = None
    cache_gears: tuple[int, ...] | None = None
    layers_per_group: int | None = None
    seed: int = 0
    vision: EvaVitConfig | None = None  # checkpoint sizes the shapes cannot tell (heads); default: real
    qformer: QFormerConfig | None = None


@dataclass
class MiniGPT4Modules:
    vision: EvaVisionEncoder
    bridge: Bridge
    embed: LlamaEmbedding
    groups: list[LlamaDecoderGroup]
    llama: LlamaConfig
    tokenizer: bytes
    image_size: int
    source: dict = field(default_factory=dict)


def _random_modules(name: str, opts: ExportOptions, seq, cache, per_group) -> MiniGPT4Modules:
    p = PRESETS[name]
    tok = build_tiny_tokenizer()
    llama = p.llama if p.llama.vocab_size else replace(p.llama, vocab_size=512)
    proj = LinearProjectorConfig(p.qformer.hidden, llama.hidden)
    s = opts.seed
    vision = init_random_(EvaVisionEncoder(p.vision), s + 1, p.std)
    bridge = Bridge(init_random_(QFormer(p.qformer), s + 2, p.std), init_random_(LinearProjector(proj), s + 3, 0.5))
    embed = init_random_(LlamaEmbedding(llama), s + 4, 1.0)
    rope = max(cache) + max(seq)
    groups = [init_random_(LlamaDecoderGroup(llama, a, b, rope), s + 10 + a, 0.1)
              for a, b in group_bounds(llama.layers, per_group)]
    return MiniGPT4Modules(vision, bridge, embed, groups, llama, tok, p.vision.image_size,
                           {"preset": name, "seed": s})


def build_modules(opts: ExportOptions) -> MiniGPT4Modules:
    """Torch modules with real or seeded random weights, plus the tokenizer bytes."""
    seq, cache, per_group = gear_options(opts)
    if opts.checkpoint is None:
        if opts.preset not in PRESETS:
            raise InputError(f"unknown preset '{opts.preset}' (available: {', '.join(PRESETS)})")
        mods = _random_modules(opts.preset, opts, seq, cache, per_group)
    else:
        from .minigpt4_load import load_modules

        mods = load_modules(Path(opts.checkpoint), opts.dtype, max(cache) + max(seq), per_group,
                            opts.vision, opts.qformer)
    for m in [mods.vision, mods.bridge, mods.embed, *mods.groups]:
        m.eval().to(getattr(torch, opts.dtype))
    return mods


def gear_options(opts: ExportOptions):
    base = PRESETS[opts.preset] if opts.checkpoint is None and opts.preset in PRESETS else None
    seq = opts.seq_gears or (base.seq_gears if base else REAL_GEARS["seq_gears"])
    cache = opts.cache_gears or (base.cache_gears if base else REAL_GEARS["cache_gears"])
    per_group = opts.layers_per_group or (base.layers_per_group if base else REAL_GEARS["layers_per_group"])
    seq, cache = tuple(sorted(set(seq))), tuple(sorted(set(cache)))
    if min(seq) < 1 or min(cache) < 1:
        raise InputError(f"gears must be positive: seq {seq}, cache {cache}")
    if 1 not in seq:
        raise InputError(f"--seq-gears must include 1 for decoding, got {seq}")
    return seq, cache, per_group


def image_subgraphs(m: MiniGPT4Modules, dtype: str) -> list[Subgraph]:
    v, q = m.vision.cfg, m.bridge.encoder.cfg
    tdtype = getattr(torch, dtype)
    vision = Subgraph(
        "vision", m.vision, [TensorDecl("pixel_values", dtype, (1, 3, v.image_size, v.image_size))],
        [TensorDecl("image_embeds", dtype, (1, v.num_tokens, v.width))],
        lambda g, gen: {"pixel_values": torch.randn(1, 3, v.image_size, v.image_size, generator=gen).to(tdtype)})
    bridge = Subgraph(
        "bridge", m.bridge, [TensorDecl("image_embeds", dtype, (1, v.num_tokens, v.width))],
        [TensorDecl("image_tokens", dtype, (1, q.num_query, m.llama.hidden))],
        lambda g, gen: {"image_embeds": torch.randn(1, v.num_tokens, v.width, generator=gen).to(tdtype)})
    return [vision, bridge]


def plan(opts: ExportOptions) -> ExportPlan:
    if opts.dtype != "float32":
        raise InputError(f"--dtype {opts.dtype}: this release exports float32 bundles only")
    seq, cache, per_group = gear_options(opts)
    m = build_modules(opts)
    subgraphs = [*image_subgraphs(m, opts.dtype), embed_subgraph(m.embed, m.llama, list(seq), opts.dtype),
                 *[group_subgraph(i, g, list(seq), list(cache), opts.dtype) for i, g in enumerate(m.groups)]]
    manifest = {
        "pipeline": {"image_graphs": ["vision", "bridge"], "embed_graph": "embed",
                     "decoder_graphs": [s.name for s in subgraphs[3:]],
                     "image_tokens": m.bridge.encoder.cfg.num_query, "hidden_size": m.llama.hidden,
                     "embeds_dtype": opts.dtype},
        "kv_cache": llm_manifest(m.llama, m.groups, list(cache), opts.dtype),
        "model": {"llama": vars(m.llama), "vision": vars(m.vision.cfg), "qformer": vars(m.bridge.encoder.cfg)},
        "tokenizer": {"kind": "sentencepiece", "file": "tokenizer.model", "bos_id": 1, "eos_id": 2,
                      "eos_ids": [2]},
        "special_tokens": {"bos": "<s>", "eos": "</s>", "unk": "<unk>"},
        "prompt": PROMPT, "generation": GENERATION,
        "preprocess": {"processor": "Blip2ImageEvalProcessor", "steps": preprocess_steps(m.image_size)},
    }
    variant = m.source.get("preset") or "vicuna0-7b"
    return ExportPlan(FAMILY, variant, opts.dtype, subgraphs, {"tokenizer.model": m.tokenizer}, manifest,
                      provenance={"source": m.source, "options": {
                          "preset": opts.preset if opts.checkpoint is None else None,
                          "checkpoint": str(opts.checkpoint) if opts.checkpoint else None,
                          "dtype": opts.dtype, "seq_gears": list(seq), "cache_gears": list(cache),
                          "layers_per_group": per_group, "seed": opts.seed}})
