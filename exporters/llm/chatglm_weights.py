"""A ChatGLM-6B LLM inside a checkpoint: its config and one name table with a prefix.

Why one table with parameters: the GLM tensors of VisualGLM-6B's two published layouts share every
name below ``transformer.`` and differ in three things only::

    Hugging Face (ChatGLMForConditionalGeneration[WithImage])   lm_head.weight
        query_key_value rows head-interleaved [q_h|k_h|v_h] per head (graphs/chatglm.py's layout)
        RoPE buffer transformer.layers.N.attention.rotary_emb.inv_freq
    SwissArmyTransformer (ChatGLMModel, VisualGLMModel)         mixins.chatglm-final.lm_head.weight
        query_key_value rows contiguous [Q|K|V] (SAT splits the projection in three)
        RoPE buffer mixins.chatglm-attn.rotary_emb.inv_freq (one, shared by the layers)

so a ``ChatGLMKeys`` says which, and ``decoder_group_state`` permutes SAT's rows per head after
reading (the graphs never see a checkpoint layout). Config fields: the HF ``ChatGLMConfig`` and
SAT's args, which use the same names (reference: model-architectures.md 2.3, 2.5).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from vlm2om.graphs.chatglm import ChatGLMConfig, ChatGLMDecoderGroup, ChatGLMEmbedding

from vlm2om.exporters.core.checkpoints import (CheckpointError, Ignore, MappingTable, SizeCheck, TensorSource,
                                               count_indexed, dim, size_hint)
from vlm2om.exporters.core.options import Gears
from vlm2om.exporters.llm.common import LlmParts
from vlm2om.exporters.llm.weights import LlmModules

LAYER_LEAVES = tuple(f"{m}.{p}" for m in ("input_layernorm", "attention.query_key_value", "attention.dense",
                                          "post_attention_layernorm", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
                     for p in ("weight", "bias"))
_QKV = re.compile(r"layers\.\d+\.attention\.query_key_value\.(weight|bias)")


@dataclass(frozen=True)
class ChatGLMKeys:
    """Where a checkpoint keeps the GLM's tensors, and how its qkv rows are ordered."""

    model: str = "transformer."  # prefix of word_embeddings, layers.N.*, final_layernorm
    lm_head: str = "lm_head.weight"
    contiguous_qkv: bool = False  # SAT: [Q|K|V]; HF: per head [q_h|k_h|v_h]
    rope_buffer: str = r"transformer\.layers\.\d+\.attention\.rotary_emb\.inv_freq"  # a regex

    @property
    def ignore(self) -> tuple[Ignore, ...]:
        return (Ignore(self.rope_buffer, "RoPE inv_freq buffer; the graph computes its own table "
                                         "(ChatGLMConfig.rope_precision)"),)

    @property
    def embed(self) -> MappingTable:
        return MappingTable((("word_embeddings.weight", f"{self.model}word_embeddings.weight"),))

    @property
    def decoder(self) -> MappingTable:
        """Our group's ``layers.j`` is the checkpoint's layer start + j (placeholder map)."""
        return MappingTable(
            tuple((f"layers.{{i}}.{s}", f"{self.model}layers.{{i}}.{s}") for s in LAYER_LEAVES)
            + (("final_layernorm.weight", f"{self.model}final_layernorm.weight"),  # last group only
               ("final_layernorm.bias", f"{self.model}final_layernorm.bias"),
               ("lm_head.weight", self.lm_head)),  # [vocab, hidden], no bias
            self.ignore)


HF_KEYS = ChatGLMKeys()
SAT_KEYS = ChatGLMKeys(lm_head="mixins.chatglm-final.lm_head.weight", contiguous_qkv=True,
                       rope_buffer=r"mixins\.chatglm-attn\.rotary_emb\.inv_freq")


def contiguous_to_interleaved(t: torch.Tensor, heads: int) -> torch.Tensor:
    """query_key_value rows (or bias) [Q|K|V] (SAT) -> per head [q_h|k_h|v_h] (HF, ours)."""
    rest = t.shape[1:]
    return t.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(t.shape).contiguous()


# --- config ----------------------------------------------------------------------------------

def _int(raw: dict, key: str, where: str, default: int | None = None) -> int:
    value = raw.get(key)
    value = default if value is None else value
    if value is None:
        raise CheckpointError(f"{where}: missing field {key}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"{where}: {key}={value!r} is not an integer") from None


def chatglm_config(raw: dict, where: str) -> ChatGLMConfig:
    """Our ChatGLMConfig from an HF config.json or SAT model_config.json dict (same field names);
    refuses what graphs/chatglm.py does not compute. Absent ``inner_hidden_size`` is 4 * hidden and
    absent ``layernorm_epsilon`` 1e-5: SAT's defaults, which its model_config.json leaves out."""
    if raw.get("position_encoding_2d", True) is not True:
        raise CheckpointError(f"{where}: position_encoding_2d={raw['position_encoding_2d']!r}; "
                              "our ChatGLM graph computes the 2-D rotary positions only")
    if raw.get("quantization_bit"):
        raise CheckpointError(f"{where}: quantization_bit={raw['quantization_bit']} (an int4/int8 checkpoint); "
                              "export the fp16 weights")
    if raw.get("pre_seq_len"):
        raise CheckpointError(f"{where}: pre_seq_len={raw['pre_seq_len']} (a P-tuning prefix encoder) is not "
                              "supported")
    hidden, heads = _int(raw, "hidden_size", where), _int(raw, "num_attention_heads", where)
    per_head = raw.get("hidden_size_per_attention_head")
    if per_head not in (None, hidden // heads):
        raise CheckpointError(f"{where}: hidden_size_per_attention_head={per_head} is not hidden_size / heads "
                              f"= {hidden // heads}")
    try:
        return ChatGLMConfig(vocab_size=_int(raw, "vocab_size", where), hidden=hidden,
                             layers=_int(raw, "num_layers", where), heads=heads,
                             ffn=_int(raw, "inner_hidden_size", where, 4 * hidden),
                             ln_eps=float(raw.get("layernorm_epsilon") or 1e-5),
                             max_positions=_int(raw, "max_sequence_length", where, 2048))
    except ValueError as err:
        raise CheckpointError(f"{where}: {err}") from None


def special_ids(raw: dict, where: str) -> dict[str, int | None]:
    """bos/eos/mask/gmask/pad token ids as the config gives them (None where absent: SAT's
    ChatGLMModel has no eos argument, so its model_config.json has no eos_token_id)."""
    return {name: (_int(raw, f"{name}_token_id", where) if raw.get(f"{name}_token_id") is not None else None)
            for name in ("bos", "eos", "mask", "gmask", "pad")}


# --- plans and states (exporters/llm/weights.py) -------------------------------------------------

def _per_head_qkv(state: dict, cfg: ChatGLMConfig, keys: ChatGLMKeys) -> None:
    """SAT's contiguous [Q|K|V] query_key_value rows in our per-head order."""
    if keys.contiguous_qkv:
        for name in [k for k in state if _QKV.fullmatch(k)]:
            state[name] = contiguous_to_interleaved(state[name], cfg.heads)


MODULES = LlmModules(ChatGLMEmbedding, ChatGLMDecoderGroup, "ChatGLM", "word_embeddings", HF_KEYS, _per_head_qkv)
llm_shapes, llm_plan, embed_state, decoder_group_state = (MODULES.shapes, MODULES.plan, MODULES.embed_state,
                                                          MODULES.group_state)


def llm_size_hint(source: TensorSource, cfg: ChatGLMConfig, keys: ChatGLMKeys, origin: str) -> str | None:
    """The GLM sizes the checkpoint's shapes tell against ``cfg``'s (``origin``: where cfg came from)."""
    m, emb = keys.model, f"{keys.model}word_embeddings.weight"
    checks = [SizeCheck("hidden size {}", cfg.hidden, dim(source, emb, 1)),
              SizeCheck("{} layers", cfg.layers, count_indexed(source.keys(), re.escape(m) + r"layers\.(\d+)\.")),
              SizeCheck("a vocabulary of {}", cfg.vocab_size, dim(source, emb, 0)),
              SizeCheck("inner size {}", cfg.ffn, dim(source, f"{m}layers.0.mlp.dense_h_to_4h.weight", 0))]
    return size_hint("ChatGLM", checks, origin)


# --- the LLM's lazy builders -------------------------------------------------------------------

def checkpoint_chatglm(open_source: Callable[[], TensorSource], cfg: ChatGLMConfig, keys: ChatGLMKeys,
                       gears: Gears, dtype: str, tokenizer: dict) -> LlmParts:
    """Builders that each open the checkpoint (``open_source``) and read one graph's tensors at
    ``dtype``; ``tokenizer`` is the manifest entry (chatglm.tokenizer_entry)."""
    from vlm2om.exporters.llm.chatglm import ChatGLMSpec, chatglm_bounds

    rope = max(gears.rope_length, cfg.max_positions)
    return MODULES.lazy(open_source, cfg, keys, ChatGLMSpec(cfg, tokenizer, gears.kv_layout), chatglm_bounds(cfg, gears),
                        dtype, rope, gears.kv_layout)
