"""MiniGPT-4 (Vicuna-v0 7B) checkpoint layout and the name maps onto our modules.

Why: MiniGPT-4's weights come from four places (EVA-CLIP ViT, the BLIP-2 Q-Former file,
MiniGPT-4's own stage-2 file, a Hugging Face Vicuna folder) that LAVIS loads with
``strict=False``, silently skipping surprises. Here every key is either mapped, on a
commented ignore list, or an error, and every shape is checked against the config.

Checkpoint directory layout::

    <checkpoint_dir>/
      eva_vit_g.pth                    bare state dict: cls_token, pos_embed, patch_embed.*,
                                       blocks.N.* (torch.save of the EVA-CLIP ViT)
      blip2_pretrained_flant5xxl.pth   {'model': {ln_vision.*, query_tokens, Qformer.bert.*,
                                                  t5_proj.*, ...}}
      pretrained_minigpt4_7b.pth       {'model': {llama_proj.weight, llama_proj.bias}}
                                       (the misspelled prerained_minigpt4_7b.pth is accepted too)
      vicuna/                          Hugging Face LlamaForCausalLM folder: config.json,
                                       tokenizer.model, and model.safetensors[.index.json] or
                                       pytorch_model[-0000k-of-0000n].bin
                                       (+ pytorch_model.bin.index.json)

Key names and shapes: shared/reference/model-architectures.md section 1.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from graphs.eva_vit import EvaVisionEncoder, EvaVitConfig
from graphs.llama import LlamaConfig, LlamaDecoderGroup, LlamaEmbedding
from graphs.projector import LinearProjector, LinearProjectorConfig
from graphs.qformer import QFormer, QFormerConfig

from .checkpoints import (HF_WEIGHT_FILES, CheckpointError, Ignore, LoadReport, MappingTable,
                          DictSource, expected_shapes, load_plans, open_hf_folder)

EVA_FILE = "eva_vit_g.pth"
BLIP2_FILE = "blip2_pretrained_flant5xxl.pth"
MINIGPT4_FILES = ("pretrained_minigpt4_7b.pth", "prerained_minigpt4_7b.pth")
LLM_DIR = "vicuna"


@dataclass(frozen=True)
class MiniGPT4Files:
    eva: Path
    blip2: Path
    minigpt4: Path
    llm_dir: Path

    @property
    def tokenizer_model(self) -> Path:
        return self.llm_dir / "tokenizer.model"


def find_files(checkpoint_dir: str | Path, need_tokenizer: bool = True) -> MiniGPT4Files:
    """Locate the four parts; the error names every missing file at once."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint directory not found")
    missing: list[str] = []
    eva, blip2 = root / EVA_FILE, root / BLIP2_FILE
    for path in (eva, blip2):
        if not path.is_file():
            missing.append(str(path))
    minigpt4 = next((root / n for n in MINIGPT4_FILES if (root / n).is_file()), None)
    if minigpt4 is None:
        missing.append(f"{root / MINIGPT4_FILES[0]} (or {MINIGPT4_FILES[1]})")
    llm = root / LLM_DIR
    if not llm.is_dir():
        missing.append(f"{llm}/ (Hugging Face Vicuna folder)")
    else:
        needed = ["config.json"] + (["tokenizer.model"] if need_tokenizer else [])
        missing += [str(llm / n) for n in needed if not (llm / n).is_file()]
        if not any((llm / n).is_file() for n in HF_WEIGHT_FILES):
            missing.append(f"{llm}/ weights (one of {', '.join(HF_WEIGHT_FILES)})")
    if missing:
        raise CheckpointError(f"{root}: incomplete MiniGPT-4 checkpoint directory; missing:\n"
                              + "\n".join(f"  - {m}" for m in missing))
    return MiniGPT4Files(eva, blip2, minigpt4, llm)


def _llm_json(llm_dir: Path) -> dict:
    path = Path(llm_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read LLM config ({err})") from None


def read_llama_config(llm_dir: str | Path) -> LlamaConfig:
    """Our LlamaConfig from HF config.json; refuses what our decoder graph does not compute."""
    path = Path(llm_dir) / "config.json"
    raw = _llm_json(Path(llm_dir))
    archs = [str(a).lower() for a in raw.get("architectures") or []]
    if raw.get("model_type") != "llama" and "llamaforcausallm" not in archs:
        raise CheckpointError(f"{path}: not a Llama model (model_type={raw.get('model_type')!r}, "
                              f"architectures={raw.get('architectures')})")
    if raw.get("rope_scaling"):
        raise CheckpointError(f"{path}: rope_scaling={raw['rope_scaling']} is not supported")
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path}: hidden_act={raw['hidden_act']!r}, our Llama uses silu")
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag):
            raise CheckpointError(f"{path}: {flag}=true is not supported")
    need = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size")
    absent = [k for k in need if k not in raw]
    if absent:
        raise CheckpointError(f"{path}: missing field(s) {', '.join(absent)}")
    heads = int(raw["num_attention_heads"])
    # Defaults are transformers' LlamaConfig defaults (LLaMA-1 configs omit some fields).
    return LlamaConfig(vocab_size=int(raw["vocab_size"]), hidden=int(raw["hidden_size"]),
                       layers=int(raw["num_hidden_layers"]), heads=heads,
                       kv_heads=int(raw.get("num_key_value_heads") or heads),
                       ffn=int(raw["intermediate_size"]),
                       rms_eps=float(raw.get("rms_norm_eps", 1e-6)),
                       rope_theta=float(raw.get("rope_theta", 10000.0)),
                       max_positions=int(raw.get("max_position_embeddings", 2048)))


# --- vision: eva_vit_g.pth (bare state dict) + ln_vision from the BLIP-2 file ----------------

# LAVIS VisionTransformer names (reference 1.1); our EvaVisionEncoder reuses them verbatim.
_EVA_BLOCK = ("norm1.weight", "norm1.bias",
              "attn.qkv.weight",              # [3*width, width], contiguous Q|K|V, no bias
              "attn.q_bias", "attn.v_bias",   # separate q/v biases (k bias is zero)
              "attn.proj.weight", "attn.proj.bias",
              "norm2.weight", "norm2.bias",
              "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
EVA_ENTRIES = (("cls_token", "cls_token"),    # [1, 1, width]
               ("pos_embed", "pos_embed"),    # [1, 1 + grid^2, width]; 224 -> 257 tokens
               ("patch_embed.proj.weight", "patch_embed.proj.weight"),  # Conv2d 14x14
               ("patch_embed.proj.bias", "patch_embed.proj.bias"),
               ) + tuple((f"blocks.{{i}}.{s}", f"blocks.{{i}}.{s}") for s in _EVA_BLOCK)


def eva_table(depth: int) -> MappingTable:
    """The EVA table; the ignore list names the block BLIP-2 drops (index ``depth``)."""
    return MappingTable(EVA_ENTRIES, (
        # EVA-CLIP-g has 40 blocks; create_eva_vit_g builds 39 and loads with strict=False.
        Ignore(rf"blocks\.{depth}\..+", f"block {depth}: BLIP-2 keeps only {depth} EVA blocks"),
        # BLIP-2's forward skips the final norm / fc_norm and has no classifier head.
        Ignore(r"norm\.(weight|bias)", "final norm unused (commented out in LAVIS eva_vit.py)"),
        Ignore(r"fc_norm\..+", "fc_norm unused (use_mean_pooling=False)"),
        Ignore(r"head\..+", "classification head unused"),
        # create_eva_vit_g sets use_rel_pos_bias=False / use_shared_rel_pos_bias=False.
        Ignore(r"rel_pos_bias\..+", "shared relative position bias is off in BLIP-2"),
        Ignore(r"blocks\.\d+\.attn\.relative_position_(index|bias_table)",
               "per-block relative position bias is off in BLIP-2"),
    ))


# BLIP-2 trains ln_vision (eps 1e-5, reference 1.2); it lives in the BLIP-2 file's ['model'].
LN_VISION = MappingTable((("ln_vision.weight", "ln_vision.weight"),
                          ("ln_vision.bias", "ln_vision.bias")))


def _meta(build):
    with torch.device("meta"):
        return build()


def vision_state(files: MiniGPT4Files, cfg: EvaVitConfig,
                 dtype: torch.dtype | None = None) -> LoadReport:
    """State for ``EvaVisionEncoder(cfg)``: the ViT from eva_vit_g.pth, ln_vision from BLIP-2."""
    want = expected_shapes(_meta(lambda: EvaVisionEncoder(cfg)))
    ln = {k: v for k, v in want.items() if k.startswith("ln_vision.")}
    trunk = {k: v for k, v in want.items() if k not in ln}
    blocks = {"i": range(cfg.depth)}
    plans = [eva_table(cfg.depth).plan(DictSource(files.eva), trunk, blocks),
             # Only ln_vision is taken here; qformer_state accounts for the rest of the file.
             LN_VISION.plan(DictSource(files.blip2, "model"), ln, check_unmapped=False)]
    return load_plans(plans, dtype, "MiniGPT-4 vision encoder")


# --- Q-Former: blip2_pretrained_flant5xxl.pth ['model'] -------------------------------------

# LAVIS BertLMHeadModel names under Qformer.bert.encoder.layer.N (reference 1.3).
_QF_LAYER = tuple(f"{blk}.{part}"
                  for blk in ("attention", "crossattention")  # crossattention: even layers only
                  for part in ("self.query.weight", "self.query.bias", "self.key.weight",
                               "self.key.bias", "self.value.weight", "self.value.bias",
                               "output.dense.weight", "output.dense.bias",
                               "output.LayerNorm.weight", "output.LayerNorm.bias")
                  ) + ("intermediate_query.dense.weight", "intermediate_query.dense.bias",
                       "output_query.dense.weight", "output_query.dense.bias",
                       "output_query.LayerNorm.weight", "output_query.LayerNorm.bias")
QFORMER_ENTRIES = (("query_tokens", "query_tokens"),  # [1, 32, 768]
                   # BertEmbeddings applies LayerNorm to the query embeds (no words/positions).
                   ("embeddings_LayerNorm.weight", "Qformer.bert.embeddings.LayerNorm.weight"),
                   ("embeddings_LayerNorm.bias", "Qformer.bert.embeddings.LayerNorm.bias"),
                   ) + tuple((f"layer.{{i}}.{s}", f"Qformer.bert.encoder.layer.{{i}}.{s}")
                             for s in _QF_LAYER)
QFORMER_IGNORE = (
    Ignore(r"ln_vision\..+", "ln_vision: loaded by vision_state"),
    Ignore(r"visual_encoder\..+", "ViT copy: MiniGPT-4 loads the ViT from eva_vit_g.pth"),
    Ignore(r"t5_proj\..+", "BLIP-2's FlanT5 projection, replaced by MiniGPT-4's llama_proj"),
    Ignore(r"t5_model\..+", "FlanT5 LLM weights, not used by MiniGPT-4"),
    Ignore(r"Qformer\.cls\..+", "MLM head: MiniGPT-4 sets Qformer.cls = None"),
    Ignore(r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\..+",
           "text FFN: MiniGPT-4 sets layer.intermediate/output = None (query FFN is used)"),
    Ignore(r"Qformer\.bert\.embeddings\.(word|position)_embeddings\..+",
           "text embeddings: MiniGPT-4 sets them to None"),
    Ignore(r"Qformer\.bert\.embeddings\.position_ids", "buffer of the removed text embeddings"),
    Ignore(r"(vision_proj|text_proj|itm_head)\..+", "BLIP-2 stage-1 contrastive/matching heads"),
    Ignore(r"temp", "BLIP-2 contrastive temperature"),
)
QFORMER_TABLE = MappingTable(QFORMER_ENTRIES, QFORMER_IGNORE)


def qformer_state(files: MiniGPT4Files, cfg: QFormerConfig,
                  dtype: torch.dtype | None = None) -> LoadReport:
    """State for ``QFormer(cfg)``; every other key of the BLIP-2 file must be on the ignore list."""
    want = expected_shapes(_meta(lambda: QFormer(cfg)))
    return QFORMER_TABLE.apply(DictSource(files.blip2, "model"), want, {"i": range(cfg.layers)},
                               dtype, what="MiniGPT-4 Q-Former")


# --- projector: pretrained_minigpt4_7b.pth ['model'] ----------------------------------------

PROJECTOR_TABLE = MappingTable(
    (("proj.weight", "llama_proj.weight"),  # [4096, 768] for Vicuna-7B (reference 1.4)
     ("proj.bias", "llama_proj.bias")),
    # The runner saves trainable params plus all buffers (runner_base._save_checkpoint).
    (Ignore(r"Qformer\.bert\.embeddings\.position_ids", "buffer saved by the MiniGPT-4 runner"),
     Ignore(r"llama_model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
            "RoPE buffer saved by the runner; recomputed from rope_theta")))


def projector_state(files: MiniGPT4Files, cfg: LinearProjectorConfig,
                    dtype: torch.dtype | None = None) -> LoadReport:
    """State for ``LinearProjector(cfg)`` from MiniGPT-4's stage-2 checkpoint."""
    want = expected_shapes(_meta(lambda: LinearProjector(cfg)))
    return PROJECTOR_TABLE.apply(DictSource(files.minigpt4, "model"), want, dtype=dtype,
                                 what="MiniGPT-4 llama_proj")


# --- LLM: Hugging Face Vicuna folder -------------------------------------------------------

EMBED_TABLE = MappingTable((("embed_tokens.weight", "model.embed_tokens.weight"),))
_LLAMA_LAYER = ("input_layernorm.weight", "post_attention_layernorm.weight",
                "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
LLM_IGNORE = (Ignore(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
                     "RoPE buffer in old Vicuna .bin files; recomputed from rope_theta"),)
# HF LlamaForCausalLM names; our group's layers.j is HF layer start + j (placeholder map).
DECODER_TABLE = MappingTable(
    tuple((f"layers.{{i}}.{s}", f"model.layers.{{i}}.{s}") for s in _LLAMA_LAYER)
    + (("norm.weight", "model.norm.weight"),   # only in the last group
       ("lm_head.weight", "lm_head.weight")),  # [vocab, hidden]
    LLM_IGNORE)
# tie_word_embeddings=true checkpoints store no lm_head; it is the embedding matrix.
_TIED_HEAD = MappingTable((("lm_head.weight", "model.embed_tokens.weight"),))


def _decoder_table(files: MiniGPT4Files) -> MappingTable:
    if _llm_json(files.llm_dir).get("tie_word_embeddings"):
        entries = tuple(e for e in DECODER_TABLE.entries if e[0] != "lm_head.weight")
        return MappingTable(entries, DECODER_TABLE.ignore) + _TIED_HEAD
    return DECODER_TABLE


def embed_state(files: MiniGPT4Files, cfg: LlamaConfig,
                dtype: torch.dtype | None = None) -> LoadReport:
    """State for ``LlamaEmbedding(cfg)``; reads only the embedding matrix."""
    want = expected_shapes(_meta(lambda: LlamaEmbedding(cfg)))
    return EMBED_TABLE.apply(open_hf_folder(files.llm_dir), want, dtype=dtype,
                             check_unmapped=False, what="Vicuna embed_tokens")


def decoder_group_state(files: MiniGPT4Files, cfg: LlamaConfig, start: int, stop: int,
                        dtype: torch.dtype | None = None) -> LoadReport:
    """State for ``LlamaDecoderGroup(cfg, start, stop)``, reading only that group's tensors.

    Keys of other groups are not judged here; ``check_llm_keys`` checks the whole folder.
    """
    want = expected_shapes(_meta(lambda: LlamaDecoderGroup(cfg, start, stop, rope_length=1)))
    layers = {"i": {j: start + j for j in range(stop - start)}}
    return _decoder_table(files).apply(open_hf_folder(files.llm_dir), want, layers, dtype,
                                       check_unmapped=False,
                                       what=f"Vicuna layers [{start}, {stop})")


def check_llm_keys(files: MiniGPT4Files, cfg: LlamaConfig) -> LoadReport:
    """Check every key and shape of the LLM folder without reading tensor data.

    Raises CheckpointError on missing, mis-shaped or unmapped keys; the returned report's
    ``state`` is empty and ``ignored`` lists the skipped buffers.
    """
    want = expected_shapes(_meta(lambda: LlamaEmbedding(cfg)))
    want.update(expected_shapes(_meta(lambda: LlamaDecoderGroup(cfg, 0, cfg.layers, 1))))
    plan = (EMBED_TABLE + _decoder_table(files)).plan(
        open_hf_folder(files.llm_dir), want, {"i": range(cfg.layers)})
    if plan.problems:
        load_plans([plan], what="Vicuna checkpoint")  # raises with every problem
    return LoadReport({}, [(plan.source.name, k, why) for k, why in plan.ignored])
