"""Full-size InternLM-XComposer2 checkpoints (VL-7B or 4KHD-7B) in the Hugging Face layout with
random fp16 weights, for the export memory benchmark (``bench_export_7b.py --model ixc2-vl`` or
``ixc2-4khd``; about 17 GB each).

internlm/internlm-xcomposer2-{vl,4khd}-7b's files: ``config.json``, ``pytorch_model-0000K-of-0000N.bin``
shards saved with torch.save plus ``pytorch_model.bin.index.json``, ``tokenizer.model``; beside them the
``clip-vit-large-patch14-336/config.json`` that sizes the tower. The tokenizer is the tiny test one
(InternLM2's own is not on this machine; its ids fit the vocabulary). Key names and shapes are written
here from the published layout (model-architectures.md 4.2-4.4), not taken from the exporter's tables.
"""
from __future__ import annotations

import json
from pathlib import Path


from fullsize_shards import write_bin_shards
from vlm2om.exporters.core.tiny_internlm2_tokenizer import build_tiny_internlm2_tokenizer

H, FFN, LAYERS, HEADS, KV, VOCAB, D = 4096, 14336, 32, 32, 8, 92544, 128
CLIP_W, CLIP_LAYERS, CLIP_MLP = 1024, 24, 4096
LAYERS_PER_SHARD = 4
CLIP_CONFIG = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768,
               "vision_config": {"hidden_size": CLIP_W, "intermediate_size": CLIP_MLP, "num_hidden_layers": CLIP_LAYERS,
                                 "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                                 "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768},
               "text_config": {"hidden_size": 768, "num_hidden_layers": 12}}


def _plora(prefix: str, out_f: int, in_f: int, r: int) -> dict:
    return {f"{prefix}.weight": (out_f, in_f), f"{prefix}.Plora_A.weight": (r, in_f),
            f"{prefix}.Plora_B.weight": (out_f, r)}


def _layer(i: int, wqkv_r: int) -> dict:
    p = f"model.layers.{i}"
    qkv = (HEADS + 2 * KV) * D
    return {**_plora(f"{p}.attention.wqkv", qkv, H, wqkv_r), **_plora(f"{p}.attention.wo", H, H, 256),
            **_plora(f"{p}.feed_forward.w1", FFN, H, 256), **_plora(f"{p}.feed_forward.w3", FFN, H, 256),
            **_plora(f"{p}.feed_forward.w2", H, FFN, 256),
            f"{p}.attention_norm.weight": (H,), f"{p}.ffn_norm.weight": (H,)}


def _tower(positions: int) -> dict:
    v = "vit.vision_tower.vision_model."
    out = {v + "embeddings.class_embedding": (CLIP_W,), v + "embeddings.patch_embedding.weight": (CLIP_W, 3, 14, 14),
           v + "embeddings.position_embedding.weight": (positions, CLIP_W),
           v + "pre_layrnorm.weight": (CLIP_W,), v + "pre_layrnorm.bias": (CLIP_W,),
           v + "post_layernorm.weight": (CLIP_W,), v + "post_layernorm.bias": (CLIP_W,)}
    for i in range(CLIP_LAYERS):
        e = f"{v}encoder.layers.{i}."
        for m, shape in (("self_attn.q_proj", (CLIP_W, CLIP_W)), ("self_attn.k_proj", (CLIP_W, CLIP_W)),
                         ("self_attn.v_proj", (CLIP_W, CLIP_W)), ("self_attn.out_proj", (CLIP_W, CLIP_W)),
                         ("mlp.fc1", (CLIP_MLP, CLIP_W)), ("mlp.fc2", (CLIP_W, CLIP_MLP))):
            out[e + m + ".weight"], out[e + m + ".bias"] = shape, (shape[0],)
        for n in ("layer_norm1", "layer_norm2"):
            out[e + n + ".weight"], out[e + n + ".bias"] = (CLIP_W,), (CLIP_W,)
    return out


def write_checkpoint(root: Path, variant: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    hd = variant == "4khd"
    config = {"architectures": ["InternLMXComposer2ForCausalLM"], "model_type": "internlmxcomposer2",
              "vocab_size": VOCAB, "hidden_size": H, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "num_key_value_heads": KV, "hidden_act": "silu",
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000, "rope_scaling": None,
              "bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": False,
              "torch_dtype": "float16", **({} if hd else {"img_size": 490})}
    (root / "config.json").write_text(json.dumps(config, indent=1))
    (root / "tokenizer.model").write_bytes(build_tiny_internlm2_tokenizer())
    (root / "clip-vit-large-patch14-336").mkdir(exist_ok=True)
    (root / "clip-vit-large-patch14-336" / "config.json").write_text(json.dumps(CLIP_CONFIG, indent=1))
    wqkv_r = 8 if hd else 256
    shards = [{k: s for i in range(a, min(a + LAYERS_PER_SHARD, LAYERS)) for k, s in _layer(i, wqkv_r).items()}
              for a in range(0, LAYERS, LAYERS_PER_SHARD)]
    image = _tower(577 if hd else 1226)
    proj_in = 4 * CLIP_W if hd else CLIP_W
    image.update({"vision_proj.0.weight": (H, proj_in), "vision_proj.0.bias": (H,),
                  "vision_proj.2.weight": (H, H), "vision_proj.2.bias": (H,)})
    if hd:
        image.update({"plora_glb_GN": (1, 1, 4 * CLIP_W), "plora_sub_GN": (1, 1, 1, 4 * CLIP_W)})
    rest = {"model.tok_embeddings.weight": (VOCAB, H), "model.norm.weight": (H,), "output.weight": (VOCAB, H)}
    shards += [image, rest]
    write_bin_shards(root, shards, lambda k: "norm" in k)
