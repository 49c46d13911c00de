"""Tiny MiniGPT-4 checkpoint folders in the real formats and key names (EVA-CLIP's eva_vit_g.pth,
BLIP-2's blip2_pretrained_flant5xxl.pth with the Q-Former, MiniGPT-4's projector .pth, a sharded HF
Vicuna folder), with random weights at toy sizes."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tests.helpers.hf_folders import write_shards

from vlm2om.graphs.common import init_random_
from vlm2om.graphs.eva_vit import EvaVisionEncoder, EvaVitConfig
from vlm2om.graphs.llama import LlamaConfig, LlamaDecoderGroup, LlamaEmbedding
from vlm2om.graphs.projector import LinearProjector, LinearProjectorConfig
from vlm2om.graphs.qformer import QFormer, QFormerConfig

EVA = EvaVitConfig(image_size=28, patch_size=14, width=16, depth=2, heads=2, mlp_dim=24)
QF = QFormerConfig(hidden=16, layers=3, heads=2, ffn=24, encoder_width=16, num_query=4)
PROJ = LinearProjectorConfig(in_dim=16, out_dim=32)
LLM = LlamaConfig(vocab_size=64, hidden=32, layers=4, heads=4, kv_heads=2, ffn=48,
                  max_positions=64)
HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64,
             "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 48, "rms_norm_eps": 1e-6,
             "max_position_embeddings": 64, "hidden_act": "silu", "torch_dtype": "float16"}


def modules():
    """Seeded modules whose weights the writers store."""
    return {"vision": init_random_(EvaVisionEncoder(EVA), 1),
            "qformer": init_random_(QFormer(QF), 2),
            "proj": init_random_(LinearProjector(PROJ), 3),
            "embed": init_random_(LlamaEmbedding(LLM), 4),
            "lm": init_random_(LlamaDecoderGroup(LLM, 0, LLM.layers), 5)}


def state_dict(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _hf_llm(mods, with_buffers: bool) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": state_dict(mods["embed"])["embed_tokens.weight"]}
    for k, v in state_dict(mods["lm"]).items():
        out["lm_head.weight" if k == "lm_head.weight" else f"model.{k}"] = v
    if with_buffers:  # old Vicuna .bin files carry the RoPE buffer per layer
        for i in range(LLM.layers):
            out[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    return out


def write_vicuna(folder: Path, mods, fmt: str = "safetensors") -> Path:
    """A Hugging Face LlamaForCausalLM folder (three fp16 shards and their index, as HF splits by
    size) holding ``mods``' embed and decoder weights; .bin files carry the old RoPE buffers."""
    _write_llm(folder, _hf_llm(mods, with_buffers=fmt == "bin"), fmt)
    return folder


def _write_llm(folder: Path, tensors: dict[str, torch.Tensor], fmt: str) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(HF_CONFIG))
    (folder / "tokenizer.model").write_bytes(b"placeholder")
    shards: list[dict[str, torch.Tensor]] = [{}, {}, {}]
    for k, v in tensors.items():  # layers 0-1 | layers 2-3 | the rest, like HF's size split
        idx = 2 if not k.startswith("model.layers.") else int(k.split(".")[2]) // 2
        shards[idx][k] = v.to(torch.float16)
    write_shards(folder, shards, "safetensors" if fmt == "safetensors" else "bin", single_name=False)


def _blip2_model(mods) -> dict[str, torch.Tensor]:
    vis, qf = state_dict(mods["vision"]), state_dict(mods["qformer"])
    model = {"ln_vision.weight": vis["ln_vision.weight"], "ln_vision.bias": vis["ln_vision.bias"]}
    for k, v in qf.items():
        if k == "query_tokens":
            model[k] = v
        elif k.startswith("embeddings_LayerNorm."):
            model["Qformer.bert.embeddings.LayerNorm." + k.split(".")[-1]] = v
        else:
            model["Qformer.bert.encoder." + k] = v
    # Keys the real file has that MiniGPT-4 does not use.
    model.update({"t5_proj.weight": torch.randn(8, 16), "t5_proj.bias": torch.randn(8),
                  "Qformer.bert.encoder.layer.0.intermediate.dense.weight": torch.randn(24, 16),
                  "Qformer.bert.encoder.layer.0.output.dense.weight": torch.randn(16, 24),
                  "Qformer.bert.encoder.layer.0.output.LayerNorm.bias": torch.randn(16),
                  "Qformer.bert.embeddings.word_embeddings.weight": torch.randn(30, 16),
                  "Qformer.bert.embeddings.position_ids": torch.arange(8)[None],
                  "Qformer.cls.predictions.bias": torch.randn(30),
                  "visual_encoder.cls_token": torch.randn(1, 1, 16),
                  "temp": torch.tensor(0.07)})
    return model


def eva_file(mods) -> dict[str, torch.Tensor]:
    eva = {k: v for k, v in state_dict(mods["vision"]).items() if not k.startswith("ln_vision.")}
    # EVA-CLIP extras LAVIS skips with strict=False: block `depth` and the final norm.
    eva.update({f"blocks.{EVA.depth}.norm1.weight": torch.ones(16),
                f"blocks.{EVA.depth}.attn.qkv.weight": torch.randn(48, 16),
                "norm.weight": torch.ones(16), "norm.bias": torch.zeros(16)})
    return eva


def write_checkpoint(root: Path, mods, fmt: str = "safetensors",
               minigpt4_name: str = "pretrained_minigpt4_7b.pth") -> Path:
    root.mkdir(exist_ok=True)
    torch.save(eva_file(mods), root / "eva_vit_g.pth")
    torch.save({"model": _blip2_model(mods)}, root / "blip2_pretrained_flant5xxl.pth")
    proj = state_dict(mods["proj"])
    torch.save({"model": {"llama_proj.weight": proj["proj.weight"],
                          "llama_proj.bias": proj["proj.bias"]}}, root / minigpt4_name)
    write_vicuna(root / "vicuna", mods, fmt)
    return root
