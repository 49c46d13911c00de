"""A Llama LLM inside a Hugging Face-style checkpoint folder: its config and one name table.

Why one table with a prefix: the same Llama tensors sit under different key prefixes in the
checkpoints vlm2om reads, and everything else about them (names below the prefix, shapes, the
RoPE buffer to skip, a tied head) is the same::

    Vicuna (LlamaForCausalLM), original LLaVA   model.{embed_tokens,layers.N.*,norm}   lm_head.weight
    llava-hf, transformers < 4.52 layout        language_model.model.{...}             language_model.lm_head.weight
    llava-hf, newer layout                      model.language_model.{...}             lm_head.weight

Config fields follow transformers' ``LlamaConfig`` (reference: model-architectures.md 1.5, 3.5).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vlm2om.graphs.llama import LlamaConfig, LlamaDecoderGroup, LlamaEmbedding

from vlm2om.exporters.core.checkpoints import (CheckpointError, Ignore, LoadReport, MappingTable, SizeCheck,
                                               TensorSource, check_plans, count_indexed, dim, size_hint)
from vlm2om.exporters.core.preflight import read_json
from vlm2om.exporters.llm.weights import LlmModules, as_source

# transformers' LlamaConfig defaults, for configs that store only what differs (llava-hf's text_config).
LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                  "num_hidden_layers": 32, "num_attention_heads": 32}
_LAYER = ("input_layernorm.weight", "post_attention_layernorm.weight",
          "self_attn.q_proj.weight", "self_attn.k_proj.weight",
          "self_attn.v_proj.weight", "self_attn.o_proj.weight",
          "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


@dataclass(frozen=True)
class LlamaKeys:
    """Where a checkpoint keeps the Llama's tensors."""

    model: str = "model."  # prefix of embed_tokens, layers.N.*, norm
    lm_head: str = "lm_head.weight"
    tied: bool = False  # tie_word_embeddings: no lm_head is stored, it is the embedding matrix

    @property
    def ignore(self) -> tuple[Ignore, ...]:
        return (Ignore(re.escape(self.model) + r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
                       "RoPE buffer in old Vicuna .bin files; recomputed from rope_theta"),)

    @property
    def embed(self) -> MappingTable:
        return MappingTable((("embed_tokens.weight", f"{self.model}embed_tokens.weight"),))

    @property
    def decoder(self) -> MappingTable:
        """Our group's ``layers.j`` is the checkpoint's layer start + j (placeholder map)."""
        head = f"{self.model}embed_tokens.weight" if self.tied else self.lm_head
        return MappingTable(
            tuple((f"layers.{{i}}.{s}", f"{self.model}layers.{{i}}.{s}") for s in _LAYER)
            + (("norm.weight", f"{self.model}norm.weight"),  # only in the last group
               ("lm_head.weight", head)),                    # [vocab, hidden]
            self.ignore)


VICUNA = LlamaKeys()


def _rope_theta(raw: dict, where: str) -> float:
    """rope_theta from ``rope_parameters`` (transformers 5) or the top level; scaling is refused."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    for spec in (params, scaling):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind != "default":
            raise CheckpointError(f"{where}: RoPE type {kind!r} ({spec}) is not supported")
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))


def llama_config(raw: dict, where: str, defaults: dict | None = None) -> LlamaConfig:
    """Our LlamaConfig from a config dict; refuses what our decoder graph does not compute.

    ``defaults`` fill absent size fields (transformers' defaults, for sparse nested configs);
    without them a missing size is an error."""
    raw = {**(defaults or {}), **raw}
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act={raw['hidden_act']!r}, our Llama uses silu")
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag):
            raise CheckpointError(f"{where}: {flag}=true is not supported")
    absent = [k for k in ("vocab_size", *LLAMA_DEFAULTS) if k not in raw]
    if absent:
        raise CheckpointError(f"{where}: missing field(s) {', '.join(dict.fromkeys(absent))}")
    heads, hidden = int(raw["num_attention_heads"]), int(raw["hidden_size"])
    if raw.get("head_dim") not in (None, hidden // heads):
        raise CheckpointError(f"{where}: head_dim={raw['head_dim']} is not hidden_size / heads = {hidden // heads}")
    # The remaining defaults are transformers' LlamaConfig defaults (LLaMA-1 configs omit some).
    return LlamaConfig(vocab_size=int(raw["vocab_size"]), hidden=hidden,
                       layers=int(raw["num_hidden_layers"]), heads=heads,
                       kv_heads=int(raw.get("num_key_value_heads") or heads),
                       ffn=int(raw["intermediate_size"]),
                       rms_eps=float(raw.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(raw, where),
                       max_positions=int(raw.get("max_position_embeddings", 2048)))


def read_llama_config(llm_dir: str | Path) -> LlamaConfig:
    """Our LlamaConfig from a LlamaForCausalLM folder's config.json."""
    path = Path(llm_dir) / "config.json"
    raw = read_json(path, "LLM config")
    archs = [str(a).lower() for a in raw.get("architectures") or []]
    if raw.get("model_type") != "llama" and "llamaforcausallm" not in archs:
        raise CheckpointError(f"{path}: not a Llama model (model_type={raw.get('model_type')!r}, "
                              f"architectures={raw.get('architectures')})")
    return llama_config(raw, str(path))


def vicuna_keys(llm_dir: str | Path) -> LlamaKeys:
    """A LlamaForCausalLM folder's keys: ``model.*``, and ``lm_head`` unless the config ties it."""
    return LlamaKeys(tied=bool(read_json(Path(llm_dir) / "config.json").get("tie_word_embeddings")))


# --- plans and states (exporters/llm/weights.py) -------------------------------------------------

MODULES = LlmModules(LlamaEmbedding, LlamaDecoderGroup, "Vicuna", "embed_tokens", VICUNA)
llm_shapes, llm_plan, embed_state, decoder_group_state = (MODULES.shapes, MODULES.plan, MODULES.embed_state,
                                                          MODULES.group_state)


def check_llm_keys(folder, cfg: LlamaConfig, keys: LlamaKeys = VICUNA,
                   origin: str = "read from config.json") -> LoadReport:
    """Check every key and shape of a folder that holds only the LLM, without reading tensor data.

    Raises CheckpointError on missing, mis-shaped or unmapped keys, leading with the sizes the
    checkpoint and ``cfg`` (from ``origin``) disagree on; the returned report's ``state`` is
    empty and ``ignored`` lists the skipped buffers."""
    source = as_source(folder)
    plan = llm_plan(source, cfg, keys)
    check_plans([plan], "the Vicuna checkpoint", lambda: [llm_size_hint(source, cfg, keys, origin)])
    return LoadReport({}, [(plan.source.name, k, why) for k, why in plan.ignored])


def llm_size_hint(source: TensorSource, cfg: LlamaConfig, keys: LlamaKeys, origin: str) -> str | None:
    """The LLM sizes the checkpoint's shapes tell against ``cfg``'s (``origin``: where cfg came from)."""
    m = keys.model
    layer0 = f"{m}layers.0."
    checks = [SizeCheck("hidden size {}", cfg.hidden, dim(source, f"{m}embed_tokens.weight", 1)),
              SizeCheck("{} layers", cfg.layers, count_indexed(source.keys(), re.escape(m) + r"layers\.(\d+)\.")),
              SizeCheck("a vocabulary of {}", cfg.vocab_size, dim(source, f"{m}embed_tokens.weight", 0)),
              SizeCheck("intermediate size {}", cfg.ffn, dim(source, f"{layer0}mlp.gate_proj.weight", 0)),
              SizeCheck("key/value width {}", cfg.kv_heads * cfg.head_dim,
                        dim(source, f"{layer0}self_attn.k_proj.weight", 0))]
    return size_hint("LLM", checks, origin)
