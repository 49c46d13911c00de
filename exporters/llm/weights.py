"""How every LLM kind's checkpoint is read, whatever its names: the expected shapes come from the
kind's own embedding and decoder-group modules built on the meta device, the kind's key table
(``*_weights.py``: a dataclass with ``embed`` and ``decoder`` MappingTables) maps them to the
checkpoint's names, and each graph's builder reads only that graph's tensors when it is built.

One ``LlmModules`` per kind (Llama, ChatGLM, InternLM2) replaces a copy of these functions in each;
what differs is data: the module classes, the names in messages, the default key table, and an
optional ``post`` step on a group's state (ChatGLM permutes SAT's query_key_value rows there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from vlm2om.graphs.common import cast_module

from vlm2om.exporters.core.checkpoints import (LoadReport, Plan, TensorSource, assign, expected_shapes, on_meta,
                                               open_hf_folder)
from vlm2om.exporters.llm.common import LlmParts


def as_source(folder) -> TensorSource:
    """A TensorSource as given, or a Hugging Face-style folder opened as one."""
    return folder if hasattr(folder, "keys") else open_hf_folder(folder)


@dataclass(frozen=True)
class LlmModules:
    embedding: Callable[[Any], torch.nn.Module]  # cfg -> the embed graph's module
    group: Callable[..., torch.nn.Module]  # (cfg, start, stop, rope_length[, kv_layout]) -> one decoder group
    label: str  # the LLM in messages ("Vicuna", "ChatGLM", "InternLM2")
    embed_label: str  # its embedding in messages ("embed_tokens", ...)
    keys: Any  # the default key table
    post: Callable[[dict, Any, Any], None] | None = None  # (group state, cfg, keys): fix rows in place

    def shapes(self, cfg) -> dict[str, torch.Size]:
        want = expected_shapes(on_meta(lambda: self.embedding(cfg)))
        want.update(expected_shapes(on_meta(lambda: self.group(cfg, 0, cfg.layers, 1))))
        return want

    def plan(self, source: TensorSource, cfg, keys=None, check_unmapped: bool = True) -> Plan:
        """Every name and shape of the whole LLM (reads no tensor data)."""
        keys = keys or self.keys
        return (keys.embed + keys.decoder).plan(source, self.shapes(cfg), {"i": range(cfg.layers)}, check_unmapped)

    def embed_state(self, folder, cfg, dtype: torch.dtype | None = None, keys=None) -> LoadReport:
        """State for the embedding module; reads only the embedding matrix."""
        want = expected_shapes(on_meta(lambda: self.embedding(cfg)))
        return (keys or self.keys).embed.apply(as_source(folder), want, dtype=dtype, check_unmapped=False,
                                               what=f"{self.label} {self.embed_label}")

    def group_state(self, folder, cfg, start: int, stop: int, dtype: torch.dtype | None = None,
                    keys=None) -> LoadReport:
        """State for the group of layers [start, stop), reading only its tensors (other groups'
        keys are not judged here: ``plan`` checks them)."""
        keys = keys or self.keys
        want = expected_shapes(on_meta(lambda: self.group(cfg, start, stop, 1)))
        layers = {"i": {j: start + j for j in range(stop - start)}}
        report = keys.decoder.apply(as_source(folder), want, layers, dtype, check_unmapped=False,
                                    what=f"{self.label} layers [{start}, {stop})")
        if self.post is not None:
            self.post(report.state, cfg, keys)
        return report

    def lazy(self, open_source: Callable[[], Any], cfg, keys, spec, bounds: list[tuple[int, int]], dtype: str,
             rope: int, kv_layout: str) -> LlmParts:
        """Builders that each open the checkpoint (``open_source``) and read one graph's tensors at
        ``dtype`` (range-checked when cast); the RoPE tables hold ``rope`` positions."""
        td = getattr(torch, dtype)

        def embed():
            state = self.embed_state(open_source(), cfg, td, keys).state
            return cast_module(assign(lambda: self.embedding(cfg), state), td)

        def group(i: int):
            a, b = bounds[i]
            state = self.group_state(open_source(), cfg, a, b, td, keys).state
            g = assign(lambda: self.group(cfg, a, b, rope, kv_layout), state)
            g.init_buffers(rope)  # the RoPE tables were built on the meta device
            return cast_module(g, td)

        return LlmParts(spec, bounds, embed, group)
