"""A full-size VisualGLM-6B checkpoint in the Hugging Face layout with random fp16 weights, for the
export memory benchmark (``bench_export_7b.py --model visualglm``; about 16 GB).

THUDM/visualglm-6b's files: ``config.json`` (the remote code's ChatGLMConfig fields with the image
side's SAT arg dicts), ``pytorch_model-0000K-of-0000N.bin`` shards saved with torch.save plus
``pytorch_model.bin.index.json``, ``ice_text.model`` and ``tokenizer_config.json``. The tokenizer is
the tiny ChatGLM test tokenizer (ChatGLM's own is not on this machine): its <sop>/<eop> ids go into
the config so that the loader's tokenizer check holds. The key names are written here from the
published layout (model-architectures.md 2.5), not taken from the exporter's tables.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from fullsize_shards import write_bin_shards
from vlm2om.exporters.core.tiny_chatglm_tokenizer import build_tiny_chatglm_tokenizer, special_ids
from vlm2om.graphs.chatglm import ChatGLMConfig, ChatGLMDecoderGroup, ChatGLMEmbedding
from vlm2om.graphs.eva_vit import EvaVitConfig
from vlm2om.graphs.qformer import QFormerConfig
from vlm2om.graphs.sat_qformer import SatQFormer
from vlm2om.graphs.sat_vit import SatEvaVisionEncoder

EVA, QF, GLM = EvaVitConfig(), QFormerConfig(), ChatGLMConfig()
LAYERS_PER_SHARD = 4
EVA_ARGS = {"num_layers": EVA.depth, "hidden_size": EVA.width, "num_attention_heads": EVA.heads, "vocab_size": 1,
            "layernorm_order": "pre", "model_parallel_size": 1, "max_sequence_length": EVA.num_tokens,
            "inner_hidden_size": EVA.mlp_dim, "use_final_layernorm": False, "layernorm_epsilon": EVA.eps,
            "image_size": [EVA.image_size, EVA.image_size], "pre_len": 1, "post_len": 0, "in_channels": 3,
            "num_classes": 0, "patch_size": EVA.patch_size}
QF_ARGS = {"num_layers": QF.layers, "hidden_size": QF.hidden, "num_attention_heads": QF.heads, "vocab_size": 32,
           "layernorm_order": "post", "model_parallel_size": 1, "max_sequence_length": 0,
           "is_decoder": [i % 2 == 0 for i in range(QF.layers)], "cross_attn_hidden_size": EVA.width,
           "layernorm_epsilon": QF.eps}


def _shapes(build) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in build().state_dict().items()}


def _vit_key(ours: str) -> str:
    head = "image_encoder.vit."
    if ours.startswith(("patch_embedding.", "ln_vision.")):
        return head + "mixins." + ("cls." if ours.startswith("ln_vision.") else "") + ours
    return head + "transformer." + ours


def write_checkpoint(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    ids = special_ids(0)
    config = {"architectures": ["ChatGLMForConditionalGenerationWithImage"], "model_type": "chatglm",
              "vocab_size": GLM.vocab_size, "hidden_size": GLM.hidden, "num_layers": GLM.layers,
              "num_attention_heads": GLM.heads, "inner_hidden_size": GLM.ffn, "layernorm_epsilon": GLM.ln_eps,
              "max_sequence_length": GLM.max_positions, "position_encoding_2d": True,
              "bos_token_id": ids["<sop>"], "eos_token_id": ids["<eop>"], "mask_token_id": ids["[MASK]"],
              "gmask_token_id": ids["[gMASK]"], "pad_token_id": ids["<pad>"], "image_length": QF.num_query,
              "eva_config": EVA_ARGS, "qformer_config": QF_ARGS, "torch_dtype": "float16"}
    (root / "config.json").write_text(json.dumps(config, indent=1))
    (root / "ice_text.model").write_bytes(build_tiny_chatglm_tokenizer())
    (root / "tokenizer_config.json").write_text(json.dumps({"num_image_tokens": 0}))
    layer = _shapes(lambda: ChatGLMDecoderGroup(GLM, 0, 1, rope_length=1))
    groups = [range(a, min(a + LAYERS_PER_SHARD, GLM.layers)) for a in range(0, GLM.layers, LAYERS_PER_SHARD)]
    shards = [{f"transformer.layers.{i}.{k.split('.', 2)[2]}": s for i in g for k, s in layer.items()} for g in groups]
    image = {_vit_key(k): s for k, s in _shapes(lambda: SatEvaVisionEncoder(EVA)).items()}
    image.update({"image_encoder.qformer.transformer." + k: s for k, s in _shapes(lambda: SatQFormer(QF)).items()})
    image.update({"image_encoder.glm_proj.weight": (GLM.hidden, QF.hidden), "image_encoder.glm_proj.bias": (GLM.hidden,)})
    rest = {"transformer.word_embeddings.weight": _shapes(lambda: ChatGLMEmbedding(GLM))["word_embeddings.weight"],
            "transformer.final_layernorm.weight": (GLM.hidden,), "transformer.final_layernorm.bias": (GLM.hidden,),
            "lm_head.weight": (GLM.vocab_size, GLM.hidden)}
    shards += [image, rest]
    write_bin_shards(root, shards, lambda k: "layernorm" in k or "ln_vision" in k)
