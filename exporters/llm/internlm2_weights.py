"""An InternLM2 LLM with Partial LoRA inside a Hugging Face-style folder: its config and one table.

Why a module of its own (as llama_weights.py / chatglm_weights.py): InternLM-XComposer2-VL-7B and
-4KHD-7B keep the same InternLM2 tensors under the same names, and what differs between them (the
LoRA ranks and alphas) is read from the folder, not assumed. Keys (model-architectures.md 4.4)::

    model.tok_embeddings.weight                                   [vocab, hidden]
    model.layers.N.attention.wqkv.{weight, Plora_A.weight, Plora_B.weight} (+ bias if config.bias)
    model.layers.N.attention.wo.{...}  (+ bias if config.bias)
    model.layers.N.feed_forward.{w1, w2, w3}.{weight, Plora_A.weight, Plora_B.weight}
    model.layers.N.{attention_norm, ffn_norm}.weight, model.norm.weight
    output.weight                                                 [vocab, hidden], never tied

Our InternLM2DecoderGroup / InternLM2Embedding use the same names below ``model.`` (``output``
included), so the table is the identity plus the prefix; wqkv stays in the checkpoint's
per-KV-group row order, which is the graph's. Config fields: the remote code's
``configuration_internlm2.py`` names; absent optional fields take that class's defaults.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable


from vlm2om.graphs.internlm2 import ROPE_SCALINGS, InternLM2Config, InternLM2DecoderGroup, InternLM2Embedding

from vlm2om.exporters.core.checkpoints import (CheckpointError, Ignore, MappingTable, SizeCheck, TensorSource,
                                               count_indexed, dim, size_hint)
from vlm2om.exporters.core.options import Gears
from vlm2om.exporters.llm.common import LlmParts
from vlm2om.exporters.llm.weights import LlmModules
from vlm2om.exporters.llm.internlm2 import InternLM2Spec, internlm2_bounds

# Where each PLoRA kind sits in a layer (the original's module paths).
LORA_PATHS = {"wqkv": "attention.wqkv", "wo": "attention.wo", "w1": "feed_forward.w1",
              "w2": "feed_forward.w2", "w3": "feed_forward.w3"}
_BIASED = ("wqkv", "wo")  # config.bias adds a bias to these only; the MLP never has one
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# configuration_internlm2.py's defaults for the fields a config.json may leave out [UNVERIFIED against
# every published config; the real ones set them all].
DEFAULTS = {"hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "bias": True,
            "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False}


@dataclass(frozen=True)
class InternLM2Keys:
    """Where a checkpoint keeps the InternLM2's tensors."""

    model: str = "model."  # prefix of tok_embeddings, layers.N.*, norm
    output: str = "output.weight"

    @property
    def ignore(self) -> tuple[Ignore, ...]:
        return (Ignore(re.escape(self.model) + r"layers\.\d+\.attention\.rotary_emb\.inv_freq",
                       "RoPE buffer of older saves; recomputed from rope_theta"),)

    @property
    def embed(self) -> MappingTable:
        return MappingTable((("tok_embeddings.weight", f"{self.model}tok_embeddings.weight"),))

    @property
    def decoder(self) -> MappingTable:
        """Our group's ``layers.j`` is the checkpoint's layer start + j (placeholder map); the
        bias entries match only where the config gives the module a bias."""
        leaves = ["attention_norm.weight", "ffn_norm.weight"]
        for kind, path in LORA_PATHS.items():
            leaves += [f"{path}.weight", f"{path}.Plora_A.weight", f"{path}.Plora_B.weight"]
            leaves += [f"{path}.bias"] if kind in _BIASED else []
        return MappingTable(
            tuple((f"layers.{{i}}.{s}", f"{self.model}layers.{{i}}.{s}") for s in leaves)
            + (("norm.weight", f"{self.model}norm.weight"),  # only in the last group
               ("output.weight", self.output)),              # [vocab, hidden]
            self.ignore)


XCOMPOSER2 = InternLM2Keys()


# --- config ----------------------------------------------------------------------------------

def _rope_scaling(value, where: str) -> tuple[str | None, float]:
    """(kind, factor) of config.json's ``rope_scaling``: null, or {"type": ..., "factor": f}."""
    if value is None:
        return None, 1.0
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: rope_scaling={value!r}; expected null or {{\"type\": ..., \"factor\": ...}}")
    kind = value.get("type", value.get("rope_type"))
    if kind not in ROPE_SCALINGS[1:]:
        raise CheckpointError(f"{where}: rope_scaling type {kind!r} is not supported (InternLM2's are "
                              f"{', '.join(repr(k) for k in ROPE_SCALINGS[1:])})")
    factor = value.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1.0:
        raise CheckpointError(f"{where}: rope_scaling factor {factor!r} must be a number >= 1 (as the original checks)")
    return kind, float(factor)


def internlm2_config(raw: dict, where: str, lora: tuple) -> InternLM2Config:
    """Our InternLM2Config from a config.json dict and the LoRA table (read from the weights);
    refuses what graphs/internlm2.py does not compute."""
    absent = [k for k in REQUIRED if raw.get(k) is None]
    if absent:
        raise CheckpointError(f"{where}: missing field(s) {', '.join(absent)}")
    r = {**DEFAULTS, **{k: v for k, v in raw.items() if v is not None or k == "rope_scaling"}}
    if r["hidden_act"] != "silu":
        raise CheckpointError(f"{where}: hidden_act={r['hidden_act']!r}; InternLM2's MLP is silu-gated")
    if r["tie_word_embeddings"]:
        raise CheckpointError(f"{where}: tie_word_embeddings=true; InternLM-XComposer2 stores its own output.weight")
    if not isinstance(r["bias"], bool):
        raise CheckpointError(f"{where}: bias={r['bias']!r}; expected true or false")
    kind, factor = _rope_scaling(r["rope_scaling"], where)
    heads = int(r["num_attention_heads"])
    try:
        return InternLM2Config(vocab_size=int(r["vocab_size"]), hidden=int(r["hidden_size"]),
                               layers=int(r["num_hidden_layers"]), heads=heads,
                               kv_heads=int(r.get("num_key_value_heads") or heads), ffn=int(r["intermediate_size"]),
                               rms_eps=float(r["rms_norm_eps"]), rope_theta=float(r["rope_theta"]),
                               max_positions=int(r["max_position_embeddings"]), rope_scaling=kind,
                               rope_factor=factor, bias=r["bias"], lora=lora)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: {err}") from None


def lora_ranks(source: TensorSource, layers: int, keys: InternLM2Keys = XCOMPOSER2) -> dict[str, int]:
    """Each kind's rank from its ``Plora_A.weight`` shapes [r, in] (no tensor read): the same in
    every layer (our config has one per kind), else an error naming the layer. Layers missing a
    key are skipped here: the key check names them."""
    names = set(source.keys())
    ranks: dict[str, int] = {}
    for kind, path in LORA_PATHS.items():
        found = {i: int(source.shape(k)[0]) for i in range(layers)
                 if (k := f"{keys.model}layers.{i}.{path}.Plora_A.weight") in names}
        if not found:
            raise CheckpointError(f"{source.name}: no '{keys.model}layers.N.{path}.Plora_A.weight' in any layer: "
                                  "InternLM-XComposer2 has Partial LoRA on every projection (a plain InternLM2 "
                                  "checkpoint is not supported)")
        first, r = next(iter(found.items()))
        odd = next(((i, x) for i, x in found.items() if x != r), None)
        if odd is not None:
            raise CheckpointError(f"{source.name}: '{keys.model}layers.{odd[0]}.{path}.Plora_A.weight' has rank "
                                  f"{odd[1]}, layer {first}'s has {r}: one rank per kind is supported")
        ranks[kind] = r
    return ranks


# --- plans and states (exporters/llm/weights.py) -------------------------------------------------

MODULES = LlmModules(InternLM2Embedding, InternLM2DecoderGroup, "InternLM2", "tok_embeddings", XCOMPOSER2)
llm_shapes, llm_plan, embed_state, decoder_group_state = (MODULES.shapes, MODULES.plan, MODULES.embed_state,
                                                          MODULES.group_state)


def llm_size_hint(source: TensorSource, cfg: InternLM2Config, keys: InternLM2Keys, origin: str) -> str | None:
    """The LLM sizes the checkpoint's shapes tell against ``cfg``'s (``origin``: where cfg came from)."""
    m, emb = keys.model, f"{keys.model}tok_embeddings.weight"
    layer0 = f"{m}layers.0."
    qkv_rows = (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim
    checks = [SizeCheck("hidden size {}", cfg.hidden, dim(source, emb, 1)),
              SizeCheck("{} layers", cfg.layers, count_indexed(source.keys(), re.escape(m) + r"layers\.(\d+)\.")),
              SizeCheck("a vocabulary of {}", cfg.vocab_size, dim(source, emb, 0)),
              SizeCheck("intermediate size {}", cfg.ffn, dim(source, f"{layer0}feed_forward.w1.weight", 0)),
              SizeCheck("{} wqkv rows ((heads + 2 x kv_heads) x head_dim)", qkv_rows,
                        dim(source, f"{layer0}attention.wqkv.weight", 0))]
    hint = size_hint("LLM", checks, origin)
    names = set(source.keys())
    has_bias = f"{layer0}attention.wqkv.bias" in names
    if f"{layer0}attention.wqkv.weight" in names and has_bias != cfg.bias:
        said = (f"bias={str(cfg.bias).lower()} ({origin}; absent means true), but the checkpoint's wqkv has "
                f"{'a' if has_bias else 'no'} bias")
        hint = said if hint is None else f"{hint}; {said}"
    return hint


# --- the LLM's lazy builders -------------------------------------------------------------------

def checkpoint_internlm2(open_source: Callable[[], TensorSource], cfg: InternLM2Config, keys: InternLM2Keys,
                         gears: Gears, dtype: str, tokenizer: dict) -> LlmParts:
    """Builders that each open the checkpoint (``open_source``) and read one graph's tensors at
    ``dtype`` (range-checked when cast); ``tokenizer`` is the manifest entry (internlm2.tokenizer_entry)."""
    rope = gears.rope_length
    if cfg.rope_scaling == "dynamic" and rope > cfg.max_positions:
        raise CheckpointError(f"dynamic NTK RoPE (config.json rope_scaling): the gears need {rope} positions, "
                              f"beyond max_position_embeddings {cfg.max_positions}, where the original's table "
                              "depends on the history of the process; give smaller --cache-gears/--seq-gears")
    return MODULES.lazy(open_source, cfg, keys, InternLM2Spec(cfg, gears.kv_layout, tokenizer),
                        internlm2_bounds(cfg, gears), dtype, rope, gears.kv_layout)


__all__ = ["DEFAULTS", "LORA_PATHS", "MODULES", "XCOMPOSER2", "InternLM2Keys", "checkpoint_internlm2",
           "decoder_group_state", "embed_state", "internlm2_config", "llm_plan", "llm_shapes", "llm_size_hint",
           "lora_ranks"]
