"""Tiny InternLM-XComposer2 checkpoint folders (VL-7B and 4KHD-7B) in the published layout.

The tensors are written from a list of the ORIGINAL key names and shapes (model-architectures.md
section 4: the remote code's ``InternLMXComposer2ForCausalLM`` state dict), never from our
modules' state dicts, so a naming or shape mistake in vlm2om's tables fails the tests. Files:

    config.json                  the remote code's InternLM2 fields at toy size (+ img_size for VL)
    tokenizer.model              the tiny InternLM2 SentencePiece model (514 pieces, chat pieces 512/513)
    pytorch_model-0000k-of-0000n.bin + pytorch_model.bin.index.json   (layout "bin")
    model-0000k-of-0000n.safetensors + model.safetensors.index.json   (layout "safetensors")
                                 (one pytorch_model.bin / model.safetensors when shards == 1)
    adapter_config.json          PEFT-style r / lora_alpha / rank_pattern / alpha_pattern (optional)
    clip-vit-large-patch14-336/config.json   a CLIPModel config (text_config + vision_config), as OpenAI's

Sizes: InternLM2 hidden 64, 2 layers, 4 heads, 2 KV heads, FFN 128, vocab 514; CLIP width 32,
2 layers, 4 heads, MLP 64, patch 14 at 56 px (grid 4, 17 positions); VL runs it at img_size 70
(grid 5, 26 positions). PLoRA ranks 4 (4KHD: wqkv 2) with alphas 8 (4KHD wqkv: 4).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from tests.helpers.hf_folders import write_shards
from vlm2om.exporters.core.tiny_internlm2_tokenizer import VOCAB_SIZE, build_tiny_internlm2_tokenizer

LLM = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=1_000_000.0,
           max_position_embeddings=4096)
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56,
            patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
VL_IMG_SIZE = 70
RANKS = {"vl": dict.fromkeys(("wqkv", "wo", "w1", "w2", "w3"), 4),
         "4khd": {**dict.fromkeys(("wqkv", "wo", "w1", "w2", "w3"), 4), "wqkv": 2}}
ALPHAS = {"vl": dict.fromkeys(("wqkv", "wo", "w1", "w2", "w3"), 8),
          "4khd": {**dict.fromkeys(("wqkv", "wo", "w1", "w2", "w3"), 8), "wqkv": 4}}
ADAPTERS = {"vl": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05},
            "4khd": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "rank_pattern": {"attention.wqkv": 2},
                     "alpha_pattern": {"attention.wqkv": 4}}}
ROPE_SCALING = {"vl": None, "4khd": {"type": "dynamic", "factor": 2.0}}
PATHS = {"wqkv": "attention.wqkv", "wo": "attention.wo", "w1": "feed_forward.w1", "w2": "feed_forward.w2",
         "w3": "feed_forward.w3"}
VIT = "vit.vision_tower.vision_model."


def grid(variant: str) -> int:
    """The patch grid the tower runs at (VL: img_size, 4KHD: the CLIP folder's image size)."""
    return (VL_IMG_SIZE if variant == "vl" else CLIP["image_size"]) // CLIP["patch_size"]


def original_shapes(variant: str, pos_rows: str = "resized", bias: bool = False,
                    buffers: bool = True) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every key of the original state dict at toy size: (shape, dtype), in the model's order."""
    h, f, v = LLM["hidden_size"], LLM["intermediate_size"], LLM["vocab_size"]
    heads, kv = LLM["num_attention_heads"], LLM["num_key_value_heads"]
    d = h // heads
    fp, i64 = torch.float32, torch.int64
    out = {"model.tok_embeddings.weight": ((v, h), fp)}
    dims = {"wqkv": ((heads + 2 * kv) * d, h), "wo": (h, heads * d), "w1": (f, h), "w3": (f, h), "w2": (h, f)}
    for i in range(LLM["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for kind in ("wqkv", "wo", "w1", "w3", "w2"):
            (rows, cols), r = dims[kind], RANKS[variant][kind]
            out[f"{p}{PATHS[kind]}.weight"] = ((rows, cols), fp)
            if bias and kind in ("wqkv", "wo"):
                out[f"{p}{PATHS[kind]}.bias"] = ((rows,), fp)
            out[f"{p}{PATHS[kind]}.Plora_A.weight"] = ((r, cols), fp)
            out[f"{p}{PATHS[kind]}.Plora_B.weight"] = ((rows, r), fp)
        if buffers:
            out[f"{p}attention.rotary_emb.inv_freq"] = ((d // 2,), fp)
        out[f"{p}attention_norm.weight"] = ((h,), fp)
        out[f"{p}ffn_norm.weight"] = ((h,), fp)
    out["model.norm.weight"] = ((h,), fp)
    out["output.weight"] = ((v, h), fp)
    w, m, patch = CLIP["hidden_size"], CLIP["intermediate_size"], CLIP["patch_size"]
    rows = (grid(variant) if pos_rows == "resized" else CLIP["image_size"] // patch) ** 2 + 1
    out[f"{VIT}embeddings.class_embedding"] = ((w,), fp)
    out[f"{VIT}embeddings.patch_embedding.weight"] = ((w, 3, patch, patch), fp)
    out[f"{VIT}embeddings.position_embedding.weight"] = ((rows, w), fp)
    if buffers:
        out[f"{VIT}embeddings.position_ids"] = ((1, rows), i64)
    out[f"{VIT}pre_layrnorm.weight"], out[f"{VIT}pre_layrnorm.bias"] = ((w,), fp), ((w,), fp)
    for i in range(CLIP["num_hidden_layers"]):
        p = f"{VIT}encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            out[f"{p}self_attn.{proj}.weight"], out[f"{p}self_attn.{proj}.bias"] = ((w, w), fp), ((w,), fp)
        out[f"{p}layer_norm1.weight"], out[f"{p}layer_norm1.bias"] = ((w,), fp), ((w,), fp)
        out[f"{p}mlp.fc1.weight"], out[f"{p}mlp.fc1.bias"] = ((m, w), fp), ((m,), fp)
        out[f"{p}mlp.fc2.weight"], out[f"{p}mlp.fc2.bias"] = ((w, m), fp), ((w,), fp)
        out[f"{p}layer_norm2.weight"], out[f"{p}layer_norm2.bias"] = ((w,), fp), ((w,), fp)
    out[f"{VIT}post_layernorm.weight"], out[f"{VIT}post_layernorm.bias"] = ((w,), fp), ((w,), fp)
    width_in = w if variant == "vl" else 4 * w
    out["vision_proj.0.weight"], out["vision_proj.0.bias"] = ((h, width_in), fp), ((h,), fp)
    out["vision_proj.2.weight"], out["vision_proj.2.bias"] = ((h, h), fp), ((h,), fp)
    if variant == "4khd":
        out["plora_glb_GN"] = ((1, 1, 4 * w), fp)
        out["plora_sub_GN"] = ((1, 1, 1, 4 * w), fp)
    return out


def random_state(shapes: dict, seed: int, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Seeded values: norm weights around 1, the RoPE / position-id buffers as the model computes
    them, everything else (LoRA factors included) N(0, std)."""
    gen = torch.Generator().manual_seed(seed)
    d = LLM["hidden_size"] // LLM["num_attention_heads"]
    out = {}
    for key, (shape, dtype) in shapes.items():
        if key.endswith("position_ids"):
            out[key] = torch.arange(shape[1], dtype=dtype)[None]
        elif key.endswith("inv_freq"):
            out[key] = 1.0 / LLM["rope_theta"] ** (torch.arange(0, d, 2).float() / d)
        elif ("norm" in key or "layrnorm" in key) and key.endswith("weight"):
            out[key] = 1.0 + torch.randn(shape, generator=gen) * 0.1
        else:
            out[key] = torch.randn(shape, generator=gen) * std
    return out


def config(variant: str, dtype: torch.dtype = torch.float32, bias: bool = False, over: dict | None = None) -> dict:
    """config.json as the remote code's InternLMXcomposer2Config writes it, at toy size."""
    raw = {"architectures": ["InternLMXComposer2ForCausalLM"], "model_type": "internlmxcomposer2",
           "auto_map": {"AutoConfig": "configuration_internlm_xcomposer2.InternLMXcomposer2Config",
                        "AutoModel": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM"},
           "attn_implementation": "eager", "bias": bias, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
           "hidden_act": "silu", **LLM, "initializer_range": 0.02, "rope_scaling": ROPE_SCALING[variant],
           "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."),
           "transformers_version": "4.33.2", "use_cache": False,
           **({"img_size": VL_IMG_SIZE} if variant == "vl" else {})}
    return {**raw, **(over or {})}


def clip_config() -> dict:
    """The CLIP folder's config.json: a CLIPModel's, the tower in vision_config (as OpenAI's)."""
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 16,
            "text_config": {"model_type": "clip_text_model", "hidden_size": 16, "intermediate_size": 32,
                            "num_hidden_layers": 1, "num_attention_heads": 2},
            "vision_config": {"model_type": "clip_vision_model", "projection_dim": 16, **CLIP}}


def _write_weights(folder: Path, state: dict[str, torch.Tensor], layout: str, shards: int) -> None:
    keys = list(state)
    per = -(-len(keys) // shards)
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_shards(folder, [{k: state[k] for k in keys[n * per:(n + 1) * per]} for n in range(shards)], layout, total)


def write_ixc2_checkpoint(folder: str | Path, variant: str, seed: int = 0, layout: str = "bin", shards: int = 2,
                          adapter_config: bool | dict = True, pos_rows: str = "resized",
                          dtype: torch.dtype = torch.float32, bias: bool = False, buffers: bool = True,
                          clip: str | None = "inside", tokenizer: bool = True, config_over: dict | None = None,
                          edit: Callable[[dict], dict] | None = None) -> dict[str, torch.Tensor]:
    """Write a complete tiny folder; return its state dict (original names, fp32: the values as
    stored, so an fp16 folder's are fp16-rounded).

    ``variant`` "vl" | "4khd"; ``layout`` "bin" | "safetensors" over ``shards`` files;
    ``adapter_config`` True (ADAPTERS[variant]), a dict to write instead, or False (none);
    ``pos_rows`` "resized" (the table at the size the tower runs) | "clip" (the CLIP folder's 17
    rows, which the VL loader resizes); ``buffers``: the RoPE inv_freq and CLIP position_ids older
    saves carry; ``clip`` "inside" | "beside" | None (no CLIP folder); ``edit(state) -> state``
    changes the tensors before they are written (for the fault tests)."""
    if variant not in RANKS or layout not in ("bin", "safetensors") or pos_rows not in ("resized", "clip"):
        raise ValueError(f"variant {variant!r}, layout {layout!r}, pos_rows {pos_rows!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = random_state(original_shapes(variant, pos_rows, bias, buffers), seed)
    state = edit(dict(state)) if edit else state
    stored = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    _write_weights(folder, stored, layout, shards)
    (folder / "config.json").write_text(json.dumps(config(variant, dtype, bias, config_over), indent=2))
    if tokenizer:
        (folder / "tokenizer.model").write_bytes(build_tiny_internlm2_tokenizer())
    if adapter_config:
        adapter = ADAPTERS[variant] if adapter_config is True else adapter_config
        (folder / "adapter_config.json").write_text(json.dumps(adapter, indent=2))
    if clip is not None:
        clip_dir = (folder if clip == "inside" else folder.parent) / "clip-vit-large-patch14-336"
        clip_dir.mkdir(parents=True, exist_ok=True)
        (clip_dir / "config.json").write_text(json.dumps(clip_config(), indent=2))
    return {k: v.float() if v.is_floating_point() else v for k, v in stored.items()}
