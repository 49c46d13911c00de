"""A tiny transformers ``LlavaForConditionalGeneration`` and writers of its weights in every LLaVA-1.5
checkpoint layout vlm2om reads (key names and file formats as published; sizes are toy)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers as T

from tests.helpers.hf_folders import write_shards
from vlm2om.exporters.core.tiny_tokenizer import VOCAB_SIZE, build_tiny_tokenizer

IMAGE_TOKEN = VOCAB_SIZE  # <image> right after the SentencePiece pieces, as llava-hf's 32000
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=56, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
TEXT = dict(vocab_size=VOCAB_SIZE + 64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=4096)
IMAGE_TOKENS = (VISION["image_size"] // VISION["patch_size"]) ** 2  # 16: CLS dropped


def hf_llava(seed: int = 0) -> T.LlavaForConditionalGeneration:
    """Random weights everywhere (norms around 1), eager attention, fp32."""
    cfg = T.LlavaConfig(vision_config=T.CLIPVisionConfig(**VISION), text_config=T.LlamaConfig(**TEXT),
                        image_token_index=IMAGE_TOKEN, image_seq_length=IMAGE_TOKENS, pad_token_id=IMAGE_TOKEN + 1,
                        projector_hidden_act="gelu", vision_feature_layer=-2,
                        vision_feature_select_strategy="default", attn_implementation="eager")
    model = T.LlavaForConditionalGeneration(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = "norm" in name
            std = 0.1 if norm else (1.0 if "embed_tokens" in name else 0.08)
            p.copy_(float(norm and name.endswith("weight")) + torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def parts(model) -> dict[str, dict[str, torch.Tensor]]:
    """The model's tensors by part, named below each part's prefix (transformers 5 in memory)."""
    out: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "projector": {}, "llm": {}}
    for k, v in model.state_dict().items():
        v = v.detach().clone().contiguous()
        if k.startswith("model.vision_tower."):
            out["vision"][k[len("model.vision_tower."):]] = v
        elif k.startswith("model.multi_modal_projector."):
            out["projector"][k[len("model.multi_modal_projector."):]] = v
        elif k.startswith("model.language_model."):
            out["llm"][k[len("model.language_model."):]] = v
        else:
            assert k == "lm_head.weight", k
            out["llm"]["lm_head.weight"] = v
    return out


def _llm(p, model_prefix: str, head: str) -> dict[str, torch.Tensor]:
    return {(head if k == "lm_head.weight" else model_prefix + k): v for k, v in p["llm"].items()}


def _write_shards(folder: Path, tensors: dict[str, torch.Tensor], fmt: str, shards: int) -> None:
    """HF-style shards plus index (or one file when ``shards`` is 1), fp16 like the real ones."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    half = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}
    write_shards(folder, [{k: half[k] for k in names[i::shards]} for i in range(shards)],
                 "safetensors" if fmt == "safetensors" else "bin")


def _tokenizer(folder: Path, legacy: bool | None = False) -> None:
    (folder / "tokenizer.model").write_bytes(build_tiny_tokenizer())
    if legacy is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps({"legacy": legacy, "add_bos_token": True}))


def hf_config(**over) -> dict:
    """config.json as llava-hf published it (transformers 4.x): sizes in text_/vision_config."""
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "image_token_index": IMAGE_TOKEN, "pad_token_id": IMAGE_TOKEN + 1, "projector_hidden_act": "gelu",
            "text_config": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **TEXT},
            "vision_config": {"model_type": "clip_vision_model", "projection_dim": 768, **VISION},
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
            "tie_word_embeddings": False, "vocab_size": TEXT["vocab_size"], **over}


def write_llava_hf(folder: Path, model, scheme: str) -> Path:
    """``saved``: transformers 5's own save_pretrained; ``old``: llava-hf as published (sharded);
    ``new``: the later key scheme (model.language_model.*, one file)."""
    folder.mkdir(parents=True, exist_ok=True)
    if scheme == "saved":
        model.save_pretrained(folder)
    else:
        p = parts(model)
        base, llm, head = ("", "language_model.model.", "language_model.lm_head.weight") if scheme == "old" \
            else ("model.", "model.language_model.", "lm_head.weight")
        tensors = {**_llm(p, llm, head),
                   **{f"{base}multi_modal_projector.{k}": v for k, v in p["projector"].items()},
                   **{f"{base}vision_tower.vision_model.{k}": v for k, v in p["vision"].items()}}
        _write_shards(folder, tensors, "safetensors", 3 if scheme == "old" else 1)
        (folder / "config.json").write_text(json.dumps(hf_config()))
    _tokenizer(folder)
    return folder


def original_config(**over) -> dict:
    """config.json of liuhaotian/llava-v1.5-7b (LlavaLlamaForCausalLM) at toy size."""
    return {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "_name_or_path": "lmsys/vicuna-7b-v1.5",
            "hidden_act": "silu", **TEXT, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16", "image_aspect_ratio": "pad",
            "mm_hidden_size": VISION["hidden_size"], "mm_projector_type": "mlp2x_gelu",
            "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
            "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14-336",
            "tokenizer_model_max_length": 2048, "use_mm_proj": True, **over}


def write_llava_original(folder: Path, model, fmt: str = "bin", clip_beside: bool = False) -> Path:
    """The LLaVA folder (sharded, with the RoPE buffers and the tower copy older saves carry) and
    the OpenAI CLIP folder, inside it or beside it."""
    p = parts(model)
    tensors = {**_llm(p, "model.", "lm_head.weight"),
               **{f"model.mm_projector.{0 if k.startswith('linear_1') else 2}.{k.split('.')[-1]}": v
                  for k, v in p["projector"].items()},
               **{f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in p["vision"].items()}}
    for i in range(TEXT["num_hidden_layers"]):
        tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    _write_shards(folder, tensors, fmt, 2)
    (folder / "config.json").write_text(json.dumps(original_config()))
    _tokenizer(folder)
    clip = (folder.parent if clip_beside else folder) / "clip-vit-large-patch14-336"
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    clip.mkdir(parents=True, exist_ok=True)
    (clip / "config.json").write_text(json.dumps(
        {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 8,
         "text_config": {"model_type": "clip_text_model", **text},
         "vision_config": {"model_type": "clip_vision_model", **VISION}}))
    weights = {**{f"vision_model.{k}": v for k, v in p["vision"].items()},
               "vision_model.embeddings.position_ids": torch.arange(IMAGE_TOKENS + 1)[None],
               "text_model.embeddings.token_embedding.weight": torch.randn(40, 16),
               "text_model.final_layer_norm.weight": torch.ones(16),
               "visual_projection.weight": torch.randn(8, VISION["hidden_size"]),
               "text_projection.weight": torch.randn(8, 16), "logit_scale": torch.tensor(4.6)}
    torch.save(weights, clip / "pytorch_model.bin")  # fp32, as OpenAI's folder
    return folder


def export_hf_llava(root: Path, cache_gears: tuple[int, ...], batch_gears: tuple[int, ...] | None = None, seed: int = 0):
    """(the HF model, its bundle): ``hf_llava`` saved as a llava-hf folder under ``root`` and
    exported from it with ``--checkpoint`` (fp32, seq gears 1/16/64, one layer per group)."""
    from vlm2om.exporters.core.driver import write_bundle
    from vlm2om.exporters.core.extras import ExportExtras
    from vlm2om.exporters.families.llava15 import recipe as llava

    model = hf_llava(seed=seed)
    ckpt = write_llava_hf(root / "llava-1.5-tiny-hf", model, "saved")
    opts = llava.ExportOptions(preset=None, checkpoint=ckpt, dtype="float32", seq_gears=(1, 16, 64),
                               cache_gears=cache_gears, layers_per_group=1)
    extras = {"extras": ExportExtras(batch_gears=batch_gears)} if batch_gears else {}
    write_bundle(llava.plan(opts), root / "bundle", echo=lambda s: None, **extras)
    return model, root / "bundle"
