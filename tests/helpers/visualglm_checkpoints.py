"""Tiny VisualGLM-6B checkpoints in both published layouts, with random weights at toy sizes.

- Hugging Face (THUDM/visualglm-6b): config.json with the remote code's field names (the image
  side's SAT arg dicts as ``eva_config``/``qformer_config``), ``pytorch_model-0000K-of-0000N.bin``
  shards (torch.save) + ``pytorch_model.bin.index.json``, ice_text.model, tokenizer_config.json;
  GLM qkv rows per head, a ``rotary_emb.inv_freq`` buffer per layer as the HF model saves it.
- SAT (VisualGLMModel.from_pretrained's folder): SwissArmyTransformer's own ChatGLMModel with a
  BLIP2 "eva" mixin holding SAT's ViT and Q-Former, so ``state_dict()`` gives SAT's real names
  (``mixins.eva.model.*``, contiguous qkv, one shared inv_freq), saved as SAT's save does:
  ``latest``, ``model_config.json``, ``<iteration>/mp_rank_00_model_states.pt`` = {'module': ...}.
Both hold the weights of the same seeded modules of ours (``modules()``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tests.helpers.sat_models import qformer_pairs, vit_pairs
from vlm2om.exporters.core.tiny_chatglm_tokenizer import build_tiny_chatglm_tokenizer, special_ids
from vlm2om.graphs.chatglm import ChatGLMConfig, ChatGLMDecoderGroup, ChatGLMEmbedding
from vlm2om.graphs.common import init_random_
from vlm2om.graphs.eva_vit import EvaVitConfig
from vlm2om.graphs.projector import LinearProjector, LinearProjectorConfig
from vlm2om.graphs.qformer import QFormerConfig
from vlm2om.graphs.sat_qformer import SatQFormer
from vlm2om.graphs.sat_vit import SatEvaVisionEncoder

EVA = EvaVitConfig(width=32, depth=2, heads=2, mlp_dim=64)
QF = QFormerConfig(hidden=32, layers=2, heads=2, ffn=64, encoder_width=32)
GLM = ChatGLMConfig(vocab_size=728, hidden=64, layers=2, heads=4, ffn=128, max_positions=256)
PROJ = LinearProjectorConfig(QF.hidden, GLM.hidden)
IDS = special_ids(0)  # the tiny ice_text.model at id offset 0: <sop> 388, <eop> 389
BOS, EOS = IDS["<sop>"], IDS["<eop>"]
GLM_IDS = {"bos_token_id": BOS, "mask_token_id": IDS["[MASK]"], "gmask_token_id": IDS["[gMASK]"],
           "pad_token_id": IDS["<pad>"]}

# VisualGLM's SAT arg dicts (model-architectures.md 2.2) at the tiny sizes; the real qformer args
# leave inner_hidden_size out (4 * 768), the tiny FFN is 2 * hidden so it is given here.
EVA_ARGS = {"num_layers": EVA.depth, "hidden_size": EVA.width, "num_attention_heads": EVA.heads, "vocab_size": 1,
            "layernorm_order": "pre", "model_parallel_size": 1, "max_sequence_length": EVA.num_tokens,
            "inner_hidden_size": EVA.mlp_dim, "use_final_layernorm": False, "layernorm_epsilon": EVA.eps,
            "image_size": [EVA.image_size, EVA.image_size], "pre_len": 1, "post_len": 0, "in_channels": 3,
            "num_classes": 0, "patch_size": EVA.patch_size}
QFORMER_ARGS = {"num_layers": QF.layers, "hidden_size": QF.hidden, "num_attention_heads": QF.heads,
                "vocab_size": QF.num_query, "layernorm_order": "post", "model_parallel_size": 1,
                "max_sequence_length": 0, "is_decoder": [QF.has_cross(i) for i in range(QF.layers)],
                "cross_attn_hidden_size": QF.encoder_width, "layernorm_epsilon": QF.eps,
                "inner_hidden_size": QF.ffn}


def modules() -> dict[str, nn.Module]:
    """Seeded modules of ours whose weights both writers store."""
    return {"vision": init_random_(SatEvaVisionEncoder(EVA), 1, 0.1),
            "qformer": init_random_(SatQFormer(QF), 2, 0.1),
            "proj": init_random_(LinearProjector(PROJ), 3, 0.1),
            "embed": init_random_(ChatGLMEmbedding(GLM), 4, 1.0),
            "glm": init_random_(ChatGLMDecoderGroup(GLM, 0, GLM.layers), 5, 0.1)}


def _sd(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --- Hugging Face ------------------------------------------------------------------------------

def hf_config() -> dict:
    """config.json as the remote code's ChatGLMConfig writes it (field names: configuration_chatglm.py)."""
    return {"architectures": ["ChatGLMForConditionalGenerationWithImage"], "model_type": "chatglm",
            "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                         "AutoModel": "modeling_chatglm.ChatGLMForConditionalGenerationWithImage"},
            "vocab_size": GLM.vocab_size, "hidden_size": GLM.hidden, "num_layers": GLM.layers,
            "num_attention_heads": GLM.heads, "inner_hidden_size": GLM.ffn, "layernorm_epsilon": GLM.ln_eps,
            "max_sequence_length": GLM.max_positions, "position_encoding_2d": True, "use_cache": True,
            "eos_token_id": EOS, **GLM_IDS, "quantization_bit": 0, "pre_seq_len": None, "prefix_projection": False,
            "image_length": QF.num_query, "eva_config": EVA_ARGS, "qformer_config": QFORMER_ARGS,
            "torch_dtype": "float32", "transformers_version": "4.27.1"}


def hf_state(mods) -> dict[str, torch.Tensor]:
    """ChatGLMForConditionalGenerationWithImage's state dict of ``mods``' weights."""
    out = {"transformer.word_embeddings.weight": _sd(mods["embed"])["word_embeddings.weight"]}
    for k, v in _sd(mods["glm"]).items():
        out[k if k == "lm_head.weight" else f"transformer.{k}"] = v
    for i in range(GLM.layers):  # RotaryEmbedding's buffer (its _load_from_state_dict ignores it)
        out[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(GLM.rotary_dim // 2).half()
    vision, qformer = _sd(mods["vision"]), _sd(mods["qformer"])
    out.update({f"image_encoder.vit.{theirs}": vision[ours] for ours, theirs in vit_pairs(EVA)})
    out.update({f"image_encoder.qformer.{theirs}": qformer[ours] for ours, theirs in qformer_pairs(QF)})
    out.update({f"image_encoder.glm_proj.{k.removeprefix('proj.')}": v for k, v in _sd(mods["proj"]).items()})
    return out


def write_hf(folder: Path, mods=None, state: dict | None = None, shards: int = 3,
             tokenizer_config: dict | None = None, config: dict | None = None) -> Path:
    """A THUDM/visualglm-6b-style folder; ``state`` (default ``hf_state(mods)``) is split over
    ``shards`` .bin files in order, as save_pretrained splits by size."""
    folder.mkdir(parents=True)
    state = hf_state(mods) if state is None else state
    keys = list(state)
    per = -(-len(keys) // shards)
    weight_map = {}
    for n in range(shards):
        name = f"pytorch_model-{n + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[n * per:(n + 1) * per]}
        torch.save(part, folder / name)
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(config or hf_config(), indent=2))
    (folder / "ice_text.model").write_bytes(build_tiny_chatglm_tokenizer())
    tok = {"name_or_path": "THUDM/visualglm-6b", "tokenizer_class": "ChatGLMTokenizer", "bos_token": "<sop>",
           "eos_token": "<eop>", "end_token": "</s>", "gmask_token": "[gMASK]", "mask_token": "[MASK]",
           "pad_token": "<pad>", "unk_token": "<unk>", "padding_side": "left", "remove_space": False,
           "do_lower_case": False, "num_image_tokens": 0}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok if tokenizer_config is None else tokenizer_config))
    return folder


# --- SwissArmyTransformer ------------------------------------------------------------------------

def sat_model(mods) -> nn.Module:
    """SAT's ChatGLMModel with VisualGLM's "eva" mixin (a BLIP2 of SAT's ViT, Q-Former and glm_proj),
    holding ``mods``' weights (copied by the name tables of tests/helpers, every name once)."""
    from tests.helpers.chatglm_sat import build_sat_chatglm, load_into_sat
    from tests.helpers.sat_models import build_sat_qformer, build_sat_vit, copy_into_sat

    glm = build_sat_chatglm(GLM)  # imports SAT (or skips the test)
    from sat.model.base_model import BaseMixin

    ours = nn.Module()
    ours.embed, ours.group = mods["embed"], mods["glm"]
    load_into_sat(ours, glm, GLM)
    vit, qformer = build_sat_vit(EVA), build_sat_qformer(QF)
    copy_into_sat(mods["vision"], vit, vit_pairs(EVA))
    copy_into_sat(mods["qformer"], qformer, qformer_pairs(QF))
    proj = nn.Linear(PROJ.in_dim, PROJ.out_dim)
    proj.load_state_dict({k.removeprefix("proj."): v for k, v in _sd(mods["proj"]).items()})

    class Blip2(nn.Module):  # VisualGLM's blip2.py BLIP2: vit, qformer, glm_proj
        def __init__(self):
            super().__init__()
            self.vit, self.qformer, self.glm_proj = vit, qformer, proj

    class ImageMixin(BaseMixin):  # VisualGLM's visualglm.py ImageMixin keeps BLIP2 as .model
        def __init__(self):
            super().__init__()
            self.model = Blip2()

    glm.add_mixin("eva", ImageMixin())
    return glm.eval()


def sat_model_config() -> dict:
    """model_config.json as SAT's save_checkpoint dumps VisualGLMModel's args (no eos: SAT's ChatGLM
    has no such argument; layernorm_epsilon 1e-5 is SAT's default, so it is left out)."""
    return {"model_class": "VisualGLMModel", "tokenizer_type": "THUDM/chatglm-6b", "num_layers": GLM.layers,
            "hidden_size": GLM.hidden, "num_attention_heads": GLM.heads, "vocab_size": GLM.vocab_size,
            "layernorm_order": "post", "model_parallel_size": 1, "max_sequence_length": GLM.max_positions,
            "inner_hidden_size": GLM.ffn, "image_length": QF.num_query, "eva_args": EVA_ARGS,
            "qformer_args": QFORMER_ARGS, **GLM_IDS}


def write_sat(folder: Path, state: dict[str, torch.Tensor], tag: str = "3000", tokenizer: bool = True,
              config: dict | None = None) -> Path:
    """SAT's checkpoint folder of ``state`` (``sat_model(mods).state_dict()``); the tiny
    ice_text.model next to it unless ``tokenizer`` is False (SAT ships none)."""
    (folder / tag).mkdir(parents=True)
    torch.save({"module": state}, folder / tag / "mp_rank_00_model_states.pt")
    (folder / "latest").write_text(tag)
    (folder / "model_config.json").write_text(json.dumps(config or sat_model_config(), indent=4))
    if tokenizer:
        (folder / "ice_text.model").write_bytes(build_tiny_chatglm_tokenizer())
    return folder
