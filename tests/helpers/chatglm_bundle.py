"""A tiny ChatGLM (or any LLM kind's) bundle folder for runtime tests, written from exporters/llm's specs.

It is not a whole family bundle (no image graphs, tokenizer, prompt or generation entry; those
come with the VisualGLM family): only the embed and decoder graphs, exported through
``export_onnx`` with the spec's Subgraphs, and the manifest keys ``runtime.decoder.Decoder`` reads
(``graphs``, ``files``, ``pipeline``, ``kv_cache``), built the way the export plan builds them.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from torch import nn

from vlm2om.exporters.core.driver import graph_entry
from vlm2om.exporters.core.extras import apply_batch_gears
from vlm2om.exporters.core.onnx_export import export_onnx
from vlm2om.exporters.llm.chatglm import ChatGLMSpec
from vlm2om.graphs.chatglm import ChatGLMConfig, ChatGLMDecoderGroup
from vlm2om.runtime.backends.ort import OrtSession
from vlm2om.runtime.bundle import Bundle, sha256_file
from vlm2om.runtime.decoder import Decoder


def split_group(cfg: ChatGLMConfig, full: ChatGLMDecoderGroup, bounds: list[tuple[int, int]]) -> list[nn.Module]:
    """Groups [a, b) holding the weights of those layers of one group of all layers (and its kv_layout)."""
    out = []
    for a, b in bounds:
        g = ChatGLMDecoderGroup(cfg, a, b, kv_layout=full.kv_layout)
        for i, layer in enumerate(g.layers):
            layer.load_state_dict(full.layers[a + i].state_dict())
        if g.is_last:
            g.final_layernorm.load_state_dict(full.final_layernorm.state_dict())
            g.lm_head.load_state_dict(full.lm_head.state_dict())
        out.append(g.eval())
    return out


def write_chatglm_bundle(folder: Path, cfg: ChatGLMConfig, embed: nn.Module, groups: list[nn.Module],
                         bounds: list[tuple[int, int]], seq: list[int], cache: list[int],
                         batches: tuple[int, ...] = (1,), dtype: str = "float32") -> tuple[Bundle, dict]:
    """Export ``embed`` and ``groups`` into ``folder``; (the Bundle, its manifest) with the
    manifest written to ``manifest.json`` too."""
    return write_llm_bundle(folder, ChatGLMSpec(cfg, kv_layout=groups[0].kv_layout), embed, groups, bounds, seq,
                            cache, batches, dtype)


def write_llm_bundle(folder: Path, spec, embed: nn.Module, groups: list[nn.Module], bounds: list[tuple[int, int]],
                     seq: list[int], cache: list[int], batches: tuple[int, ...] = (1,),
                     dtype: str = "float32") -> tuple[Bundle, dict]:
    """The same for any LLM kind's decoder ``spec`` (exporters/llm)."""
    subgraphs = [spec.embed_subgraph(lambda: embed, seq, dtype)]
    subgraphs += [spec.group_subgraph(i, lambda g=g: g, b, seq, cache, dtype)
                  for i, (g, b) in enumerate(zip(groups, bounds))]
    apply_batch_gears(SimpleNamespace(subgraphs=subgraphs, provenance={}), batches)
    folder.mkdir(parents=True, exist_ok=True)
    graphs, files = {}, {}
    for sg in subgraphs:
        paths = export_onnx(sg, sg.build(), folder)
        graphs[sg.name] = graph_entry(sg, paths, [])
        files.update({p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in paths})
    manifest = {
        "schema_version": 2, "task": "chat", "files": files, "graphs": graphs,
        "pipeline": {"image_graphs": [], "embed_graph": "embed", "decoder_graphs": [s.name for s in subgraphs[1:]],
                     "attention": spec.attention,
                     **({"positions": dict(spec.positions)} if getattr(spec, "positions", None) else {}),
                     "hidden_size": spec.hidden, "embeds_dtype": dtype},
        "kv_cache": spec.kv_manifest(bounds, cache, dtype),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return Bundle(folder, manifest), manifest


def open_decoder(bundle: Bundle) -> Decoder:
    """The runtime's Decoder over onnxruntime sessions of the bundle's embed and decoder graphs."""
    pipe = bundle.manifest["pipeline"]
    names = [pipe["embed_graph"], *pipe["decoder_graphs"]]
    return Decoder(bundle, {n: OrtSession(bundle, n) for n in names})
