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

Key names and shapes: the architecture reference (model-architectures.md), section 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vlm2om.graphs.eva_vit import EvaVisionEncoder, EvaVitConfig
from vlm2om.graphs.llama import LlamaConfig
from vlm2om.graphs.projector import LinearProjector, LinearProjectorConfig
from vlm2om.graphs.qformer import QFormer, QFormerConfig

from vlm2om.exporters.core.checkpoints import (HF_WEIGHT_FILES, CheckpointError, DictSource, Ignore, LoadReport,
                                               MappingTable, Plan, SizeCheck, TensorSource, count_indexed, dim,
                                               expected_shapes, load_plans, on_meta, size_hint)
from vlm2om.exporters.llm import llama_weights as lw

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


def vision_plans(files: MiniGPT4Files, cfg: EvaVitConfig,
                 blocks: tuple[int, int] | None = None) -> list[Plan]:
    """The ViT from eva_vit_g.pth, ln_vision from BLIP-2 (nothing read yet). The whole encoder
    judges every key of the EVA file; a slice (``blocks``) maps only its own blocks."""
    start, stop = blocks or (0, cfg.depth)
    whole = (start, stop) == (0, cfg.depth)
    want = expected_shapes(on_meta(lambda: EvaVisionEncoder(cfg, (start, stop))))
    ln = {k: v for k, v in want.items() if k.startswith("ln_vision.")}
    trunk = {k: v for k, v in want.items() if k not in ln}
    plans = [eva_table(cfg.depth).plan(DictSource(files.eva), trunk,
                                       {"i": {j: start + j for j in range(stop - start)}}, check_unmapped=whole)]
    if ln:  # only ln_vision is taken here; qformer_plans accounts for the rest of the file
        plans.append(LN_VISION.plan(DictSource(files.blip2, "model"), ln, check_unmapped=False))
    return plans


def vision_state(files: MiniGPT4Files, cfg: EvaVitConfig, dtype: torch.dtype | None = None,
                 blocks: tuple[int, int] | None = None) -> LoadReport:
    """State for ``EvaVisionEncoder(cfg, blocks)``."""
    return load_plans(vision_plans(files, cfg, blocks), dtype, "MiniGPT-4 vision encoder"
                      + (f" blocks [{blocks[0]}, {blocks[1]})" if blocks else ""))


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


def qformer_plans(files: MiniGPT4Files, cfg: QFormerConfig) -> list[Plan]:
    """Every key of the BLIP-2 file other than the Q-Former's must be on the ignore list."""
    want = expected_shapes(on_meta(lambda: QFormer(cfg)))
    return [QFORMER_TABLE.plan(DictSource(files.blip2, "model"), want, {"i": range(cfg.layers)})]


def qformer_state(files: MiniGPT4Files, cfg: QFormerConfig,
                  dtype: torch.dtype | None = None) -> LoadReport:
    """State for ``QFormer(cfg)``."""
    return load_plans(qformer_plans(files, cfg), dtype, "MiniGPT-4 Q-Former")


# --- projector: pretrained_minigpt4_7b.pth ['model'] ----------------------------------------

PROJECTOR_TABLE = MappingTable(
    (("proj.weight", "llama_proj.weight"),  # [4096, 768] for Vicuna-7B (reference 1.4)
     ("proj.bias", "llama_proj.bias")),
    # The runner saves trainable params plus all buffers (runner_base._save_checkpoint).
    (Ignore(r"Qformer\.bert\.embeddings\.position_ids", "buffer saved by the MiniGPT-4 runner"),
     Ignore(r"llama_model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
            "RoPE buffer saved by the runner; recomputed from rope_theta")))


def projector_plans(files: MiniGPT4Files, cfg: LinearProjectorConfig) -> list[Plan]:
    want = expected_shapes(on_meta(lambda: LinearProjector(cfg)))
    return [PROJECTOR_TABLE.plan(DictSource(files.minigpt4, "model"), want)]


def projector_state(files: MiniGPT4Files, cfg: LinearProjectorConfig,
                    dtype: torch.dtype | None = None) -> LoadReport:
    """State for ``LinearProjector(cfg)`` from MiniGPT-4's stage-2 checkpoint."""
    return load_plans(projector_plans(files, cfg), dtype, "MiniGPT-4 llama_proj")


# --- LLM: the Hugging Face Vicuna folder (llama_weights; keys model.* + lm_head) ------------

def check_llm_keys(files: MiniGPT4Files, cfg: LlamaConfig) -> LoadReport:
    """Every key and shape of the Vicuna folder, without reading tensor data (raises on problems)."""
    return lw.check_llm_keys(files.llm_dir, cfg, lw.vicuna_keys(files.llm_dir),
                             f"read from {files.llm_dir / 'config.json'}")


# --- the likely cause of a size mismatch, from the shapes (for check_plans) -------------------

def image_size_hints(eva: TensorSource, blip2: TensorSource, proj: TensorSource, vcfg: EvaVitConfig,
                     qcfg: QFormerConfig, pcfg: LinearProjectorConfig, origin: str) -> list[str | None]:
    """The EVA, Q-Former and llama_proj sizes the three files' shapes tell against the options'
    (``origin``: where the EVA and Q-Former sizes came from, said once)."""
    blocks = count_indexed(eva.keys(), r"blocks\.(\d+)\.")
    # EVA-CLIP's file holds one block more than BLIP-2 builds (eva_table's ignore list): count
    # the blocks BLIP-2 would build from it.
    blocks = vcfg.depth if blocks in (vcfg.depth, vcfg.depth + 1) else blocks and blocks - 1
    layer0 = "Qformer.bert.encoder.layer.0."
    hints = [
        size_hint("EVA ViT", [SizeCheck("width {}", vcfg.width, dim(eva, "cls_token", 2)),
                              SizeCheck("{} blocks", vcfg.depth, blocks),
                              SizeCheck("patch size {}", vcfg.patch_size, dim(eva, "patch_embed.proj.weight", 3)),
                              SizeCheck("{} position embeddings", vcfg.num_patches + 1, dim(eva, "pos_embed", 1)),
                              SizeCheck("MLP size {}", vcfg.mlp_dim, dim(eva, "blocks.0.mlp.fc1.weight", 0))], None),
        size_hint("Q-Former", [SizeCheck("hidden size {}", qcfg.hidden, dim(blip2, "query_tokens", 2)),
                               SizeCheck("{} layers", qcfg.layers,
                                         count_indexed(blip2.keys(), r"Qformer\.bert\.encoder\.layer\.(\d+)\.")),
                               SizeCheck("{} query tokens", qcfg.num_query, dim(blip2, "query_tokens", 1)),
                               SizeCheck("intermediate size {}", qcfg.ffn,
                                         dim(blip2, layer0 + "intermediate_query.dense.weight", 0)),
                               SizeCheck("cross-attention width {}", qcfg.encoder_width,
                                         dim(blip2, layer0 + "crossattention.self.key.weight", 1))], None)]
    hints = [h for h in hints if h]
    if hints:  # llama_proj's input follows the Q-Former: a wrong Q-Former explains it too
        return [*hints[:-1], f"{hints[-1]} ({origin})"]
    return [size_hint("llama_proj", [SizeCheck("input width {}", pcfg.in_dim, dim(proj, "llama_proj.weight", 1)),
                                     SizeCheck("output width {}", pcfg.out_dim, dim(proj, "llama_proj.weight", 0))],
                      "the Q-Former's hidden size and the LLM's (vicuna/config.json)")]
