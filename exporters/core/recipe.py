"""What every recipe shares: the export options, the dtype rule, gears, the LLM side's lazy
builders (seeded random or from a Hugging Face-style folder) and the assembly of an ExportPlan.

Why: MiniGPT-4 and LLaVA-1.5 differ in their image graphs, prompt and preprocessing only. Both
decode with a Llama (Vicuna), so the options, gears, embed/decoder subgraphs, tokenizer entry,
manifest skeleton and provenance are written once, here; a recipe supplies its image side.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from vlm2om.graphs.common import cast_module, init_random_
from vlm2om.graphs.llama import LlamaConfig, LlamaDecoderGroup, LlamaEmbedding
from vlm2om.runtime.errors import InputError

from vlm2om.exporters.core.driver import ExportPlan
from vlm2om.exporters.llm.llama import embed_subgraph, group_bounds, group_subgraph, llm_manifest
from vlm2om.exporters.core.subgraph import Subgraph, TensorDecl

DTYPES = ("float16", "float32")
# OpenAI CLIP's normalisation, which both EVA-CLIP (MiniGPT-4) and CLIP ViT-L (LLaVA) preprocess with.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# A Llama SentencePiece tokenizer (LLaMA-1/2, Vicuna v0/v1.5, the tiny preset's): <unk>=0, <s>=1, </s>=2.
LLAMA_TOKENIZER = {"kind": "sentencepiece", "file": "tokenizer.model", "bos_id": 1, "eos_id": 2, "eos_ids": [2]}
LLAMA_SPECIALS = {"bos": "<s>", "eos": "</s>", "unk": "<unk>"}


@dataclass(frozen=True)
class Gears:
    """Prompt-chunk lengths, KV-cache capacities and decoder layers per ONNX file."""

    seq: tuple[int, ...]
    cache: tuple[int, ...]
    layers_per_group: int

    @property
    def rope_length(self) -> int:
        """Positions a RoPE table must cover: a full cache plus one padded prefill chunk."""
        return max(self.cache) + max(self.seq)


@dataclass(frozen=True)
class RecipeOptions:
    """Options every recipe takes (the CLI's); a recipe subclasses it to add its own."""

    preset: str | None = "tiny"
    checkpoint: Path | None = None
    dtype: str | None = None  # default: float16 for a checkpoint (ATC's own default), else float32
    seq_gears: tuple[int, ...] | None = None
    cache_gears: tuple[int, ...] | None = None
    layers_per_group: int | None = None
    seed: int = 0

    @property
    def export_dtype(self) -> str:
        dtype = self.dtype or ("float16" if self.checkpoint is not None else "float32")
        if dtype not in DTYPES:
            raise InputError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
        return dtype

    def provenance(self, gears: Gears) -> dict:
        """The options as recorded in the manifest: the common ones, then a recipe's own."""
        own = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in {g.name for g in fields(RecipeOptions)}}
        return {"preset": self.preset if self.checkpoint is None else None,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "dtype": self.export_dtype, "seq_gears": list(gears.seq), "cache_gears": list(gears.cache),
                "layers_per_group": gears.layers_per_group, "seed": self.seed,
                **{k: v for k, v in own.items() if isinstance(v, (str, int, float, bool))},
                # configs the checkpoint's shapes cannot tell (head counts), for rebuilding the reference
                **{k: asdict(v) for k, v in own.items() if is_dataclass(v)}}


def resolve_gears(opts: RecipeOptions, presets: Mapping[str, Gears], real: Gears) -> Gears:
    """The options' gears, else the preset's (no checkpoint), else the real-size defaults."""
    base = presets.get(opts.preset) if opts.checkpoint is None else None
    base = base or real
    seq = tuple(sorted(set(opts.seq_gears or base.seq)))
    cache = tuple(sorted(set(opts.cache_gears or base.cache)))
    if min(seq) < 1 or min(cache) < 1:
        raise InputError(f"gears must be positive: seq {seq}, cache {cache}")
    if 1 not in seq:
        raise InputError(f"--seq-gears must include 1 for decoding, got {seq}")
    return Gears(seq, cache, opts.layers_per_group or base.layers_per_group)


def check_preset(opts: RecipeOptions, presets: Mapping) -> None:
    if opts.checkpoint is None and opts.preset not in presets:
        raise InputError(f"unknown preset '{opts.preset}' (available: {', '.join(presets)})")


def assign(build: Callable[[], nn.Module], state: Mapping[str, torch.Tensor]) -> nn.Module:
    """``build()`` on the meta device, then given the checkpoint tensors themselves (no copy)."""
    with torch.device("meta"):
        module = build()
    module.load_state_dict(state, strict=True, assign=True)
    return module


@dataclass
class LlmParts:
    """The Llama side before any weight is read; each ``build_*`` makes one graph's module."""

    llama: LlamaConfig
    bounds: list[tuple[int, int]]
    build_embed: Callable[[], nn.Module]
    build_group: Callable[[int], nn.Module]


def random_llm(llama: LlamaConfig, gears: Gears, seed: int, dtype: str) -> LlmParts:
    """Seeded random weights: the embedding from ``seed + 4``, group [a, b) from ``seed + 10 + a``."""
    td, rope = getattr(torch, dtype), gears.rope_length
    bounds = group_bounds(llama.layers, gears.layers_per_group)

    def group(i: int):
        a, b = bounds[i]
        return cast_module(init_random_(LlamaDecoderGroup(llama, a, b, rope), seed + 10 + a, 0.1), td)

    return LlmParts(llama, bounds, lambda: cast_module(init_random_(LlamaEmbedding(llama), seed + 4, 1.0), td),
                    group)


def checkpoint_llm(folder: Path, llama: LlamaConfig, keys, gears: Gears, dtype: str) -> LlmParts:
    """Builders reading a Hugging Face-style folder through ``llama_weights`` with ``keys``."""
    from vlm2om.exporters.llm import llama_weights as lw

    td, rope = getattr(torch, dtype), gears.rope_length
    bounds = group_bounds(llama.layers, gears.layers_per_group)

    def embed():
        return assign(lambda: LlamaEmbedding(llama), lw.embed_state(folder, llama, td, keys).state).eval()

    def group(i: int):
        a, b = bounds[i]
        state = lw.decoder_group_state(folder, llama, a, b, td, keys).state
        g = assign(lambda: LlamaDecoderGroup(llama, a, b, rope), state)
        g.init_buffers(rope)
        return cast_module(g, td)

    return LlmParts(llama, bounds, embed, group)


@dataclass
class ReferenceModules:
    """A family's torch modules all at once: the PyTorch reference of `verify --reference` and
    `bench --baseline torch`, and tests (an export builds them one graph at a time)."""

    image: nn.Sequential  # the image graphs' modules in pipeline order: pixels -> image embeddings
    embed: nn.Module
    groups: list[nn.Module]
    llama: LlamaConfig
    tokenizer: bytes
    source: dict = field(default_factory=dict)


def reference_modules(image_builders: list[Callable[[], nn.Module]], llm: LlmParts, tokenizer: bytes,
                      source: dict) -> ReferenceModules:
    return ReferenceModules(nn.Sequential(*(build() for build in image_builders)).eval(), llm.build_embed(),
                            [llm.build_group(i) for i in range(len(llm.bounds))], llm.llama, tokenizer, source)


def image_graph(name: str, build: Callable[[], nn.Module], inp: TensorDecl, out: TensorDecl) -> Subgraph:
    """A static image-side graph, verified on standard-normal inputs of its input's shape."""
    td = getattr(torch, inp.dtype)
    return Subgraph(name, build, [inp], [out],
                    lambda gear, gen: {inp.name: torch.randn(*inp.dims, generator=gen).to(td)})


def assemble(family: str, variant: str, opts: RecipeOptions, gears: Gears, llm: LlmParts,
             image_graphs: list[Subgraph], image_tokens: int, tokenizer: bytes, source: dict,
             model: dict, described: dict) -> ExportPlan:
    """The ExportPlan: the image graphs, then ``embed`` and the decoder groups; the manifest's
    pipeline, kv_cache, model, tokenizer and special tokens, then ``described`` (prompt,
    generation, preprocess, ...) as the family gives them."""
    dtype, llama = opts.export_dtype, llm.llama
    seq, cache = list(gears.seq), list(gears.cache)
    groups = [group_subgraph(i, partial(llm.build_group, i), llama, b, seq, cache, dtype)
              for i, b in enumerate(llm.bounds)]
    subgraphs = [*image_graphs, embed_subgraph(llm.build_embed, llama, seq, dtype), *groups]
    manifest = {
        "pipeline": {"image_graphs": [s.name for s in image_graphs], "embed_graph": "embed",
                     "decoder_graphs": [s.name for s in groups], "image_tokens": image_tokens,
                     "hidden_size": llama.hidden, "embeds_dtype": dtype},
        "kv_cache": llm_manifest(llama, llm.bounds, cache, dtype),
        "model": model, "tokenizer": dict(LLAMA_TOKENIZER), "special_tokens": dict(LLAMA_SPECIALS),
        **described,
    }
    return ExportPlan(family, variant, dtype, subgraphs, {"tokenizer.model": tokenizer}, manifest,
                      provenance={"source": source, "options": opts.provenance(gears)})
