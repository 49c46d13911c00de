"""An export plan and how a family assembles one: its image graphs, then the LLM kind's embed
and decoder-group graphs, and the manifest entries they imply.

Why here: MiniGPT-4 and LLaVA-1.5 differ in their image graphs, prompt and preprocessing only;
the pipeline entry, the KV-cache entry, the tokenizer entry and the provenance are written once.
A family supplies its image side and its LLM kind's parts (``llm.common.LlmParts``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from vlm2om.exporters.core.options import Gears, RecipeOptions
from vlm2om.exporters.core.subgraph import Subgraph, TensorDecl
from vlm2om.exporters.llm.common import LlmParts

# OpenAI CLIP's normalisation, which both EVA-CLIP (MiniGPT-4) and CLIP ViT-L (LLaVA) preprocess with.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class ExportPlan:
    family: str
    variant: str
    dtype: str
    subgraphs: list[Subgraph]
    assets: dict[str, bytes]  # bundle-relative name -> content (tokenizer, ...)
    manifest: dict  # family entries: pipeline, kv_cache, tokenizer, prompt, generation, preprocess
    provenance: dict = field(default_factory=dict)
    task: str = "chat"  # the runtime pipeline the bundle needs (runtime/schema.py)
    llm: Any = None  # the LLM kind's decoder spec: its reference forward serves the golden trace


@dataclass
class ReferenceModules:
    """A family's torch modules all at once: the PyTorch reference of `verify --reference` and
    `bench --baseline torch`, and tests (an export builds them one graph at a time)."""

    image: nn.Sequential  # the image graphs' modules in pipeline order: pixels -> image embeddings
    embed: nn.Module
    groups: list[nn.Module]
    llama: Any  # the LLM's config
    tokenizer: bytes
    source: dict = field(default_factory=dict)
    spec: Any = None  # the LLM kind's decoder spec (its reference_forward runs a group)


def reference_modules(image_builders: list[Callable[[], nn.Module]], llm: LlmParts, tokenizer: bytes,
                      source: dict) -> ReferenceModules:
    return ReferenceModules(nn.Sequential(*(build() for build in image_builders)).eval(), llm.build_embed(),
                            [llm.build_group(i) for i in range(len(llm.bounds))], llm.llama, tokenizer, source,
                            llm.spec)


def image_graph(name: str, build: Callable[[], nn.Module], inp: TensorDecl, out: TensorDecl,
                batches: tuple[int, ...] | None = None) -> Subgraph:
    """An image-side graph, verified on standard-normal inputs of its input's shape: static, or
    with ``batches`` its ``batch`` dim takes those values (gears), for images cut into views."""
    td = getattr(torch, inp.dtype)
    gears = [{"batch": b} for b in batches] if batches else [{}]

    def make(gear, gen):
        return {inp.name: torch.randn(*(gear.get(d, d) for d in inp.dims), generator=gen).to(td)}

    return Subgraph(name, build, [inp], [out], make, gears)


def assemble(family: str, variant: str, opts: RecipeOptions, gears: Gears, llm: LlmParts,
             image_graphs: list[Subgraph], image_tokens: int | None, tokenizer: bytes, source: dict,
             model: dict, described: dict) -> ExportPlan:
    """The ExportPlan: the image graphs, then ``embed`` and the decoder groups; the manifest's
    pipeline, kv_cache, model, tokenizer and special tokens, then ``described`` (prompt,
    generation, preprocess, ...) as the family gives them. ``image_tokens`` None: the count
    varies with the image."""
    dtype, spec = opts.export_dtype, llm.spec
    seq, cache = list(gears.seq), list(gears.cache)
    groups = [spec.group_subgraph(i, partial(llm.build_group, i), b, seq, cache, dtype)
              for i, b in enumerate(llm.bounds)]
    subgraphs = [*image_graphs, spec.embed_subgraph(llm.build_embed, seq, dtype), *groups]
    manifest = {
        "pipeline": {"image_graphs": [s.name for s in image_graphs], "image_input": image_graphs[0].inputs[0].name,
                     "image_output": image_graphs[-1].outputs[0].name, "image_tokens": image_tokens,
                     "embed_graph": "embed", "decoder_graphs": [s.name for s in groups],
                     "attention": spec.attention, "hidden_size": spec.hidden, "embeds_dtype": dtype},
        "kv_cache": spec.kv_manifest(llm.bounds, cache, dtype),
        "model": model, "tokenizer": dict(spec.tokenizer), "special_tokens": dict(spec.special_tokens),
        **described,
    }
    if getattr(spec, "positions", None):  # a kind whose positions are not the 1-D index (ChatGLM's 2-D)
        manifest["pipeline"]["positions"] = dict(spec.positions)
    return ExportPlan(family, variant, dtype, subgraphs, {spec.tokenizer["file"]: tokenizer}, manifest,
                      provenance={"source": source, "options": opts.provenance(gears)}, llm=spec)
