"""The CLIP vision tower inside a checkpoint: its config and one name table with a key prefix.

Why shared: LLaVA-1.5 reads the tower from OpenAI's ``clip-vit-large-patch14-336`` folder (or from
llava-hf's own folder), InternLM-XComposer2 from its checkpoint's ``vit.vision_tower.`` with the
config from that same CLIP folder. Below the prefix the names are transformers'
``CLIPVisionTransformer``'s, which graphs/clip_vit.py's ClipVisionTower reuses as they are, and
both families size the tower from a transformers CLIP config.json (``CLIPModel``, whose
``vision_config`` holds the tower, or ``CLIPVisionModel``).
"""
from __future__ import annotations

import re
from pathlib import Path

from vlm2om.graphs.clip_vit import ClipVisionConfig, ClipVisionTower

from vlm2om.exporters.core.checkpoints import CheckpointError, Ignore, MappingTable

CLIP_FOLDER = "clip-vit-large-patch14-336"
# transformers' CLIPVisionConfig defaults, for configs that store only what differs.
CLIP_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "image_size": 224, "patch_size": 32,
                 "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
_CLIP_LAYER = tuple(f"{m}.{p}" for m in ("layer_norm1", "self_attn.q_proj", "self_attn.k_proj",
                                         "self_attn.v_proj", "self_attn.out_proj", "layer_norm2",
                                         "mlp.fc1", "mlp.fc2") for p in ("weight", "bias"))
# transformers' CLIPVisionTransformer names without ``vision_model.``; ClipVisionTower reuses them.
CLIP_ENTRIES = tuple((n, n) for n in ("embeddings.class_embedding",              # [width]
                                      "embeddings.patch_embedding.weight",        # conv, no bias
                                      "embeddings.position_embedding.weight",     # [577, width]
                                      "pre_layrnorm.weight", "pre_layrnorm.bias")
                     ) + tuple((f"encoder.layers.{{i}}.{s}", f"encoder.layers.{{i}}.{s}") for s in _CLIP_LAYER)
POSITIONS = "embeddings.position_embedding.weight"


def clip_ignore(prefix: str, cfg: ClipVisionConfig, why: str) -> tuple[Ignore, ...]:
    """The tower's keys past ``hidden_states[select_layer]`` (``why``: the family's words for it)
    and the ``position_ids`` buffer older transformers saved."""
    p = re.escape(prefix)
    return (*(Ignore(p + re.escape(k) + ".+", why) for k in ClipVisionTower.unused_checkpoint_keys(cfg)),
            Ignore(p + r"embeddings\.position_ids", "buffer (0..N-1) saved by older transformers"))


def clip_table(prefix: str, cfg: ClipVisionConfig, why: str) -> MappingTable:
    """ClipVisionTower <- the tower's keys below ``prefix`` (``why``: see ``clip_ignore``)."""
    return MappingTable(tuple((o, prefix + t) for o, t in CLIP_ENTRIES), clip_ignore(prefix, cfg, why))


def clip_config(raw: dict, where: str, select_layer: int, keep_cls: bool, model: str) -> ClipVisionConfig:
    """ClipVisionConfig from a CLIPVisionConfig dict (``model``: whose tower, for the errors)."""
    if raw.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise CheckpointError(f"{where}: vision model_type {raw['model_type']!r}; {model}'s tower is CLIP")
    r = {**CLIP_DEFAULTS, **raw}
    if r["hidden_act"] not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"{where}: CLIP hidden_act {r['hidden_act']!r} is not supported")
    try:
        return ClipVisionConfig(image_size=int(r["image_size"]), patch_size=int(r["patch_size"]),
                                width=int(r["hidden_size"]), layers=int(r["num_hidden_layers"]),
                                heads=int(r["num_attention_heads"]), mlp_dim=int(r["intermediate_size"]),
                                act=r["hidden_act"], eps=float(r["layer_norm_eps"]),
                                select_layer=int(select_layer), keep_cls=keep_cls)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: {err}") from None


def vision_section(raw: dict, where: str) -> tuple[dict, str]:
    """The CLIPVisionConfig part of a CLIP folder's config.json: ``vision_config`` of a CLIPModel
    (as openai/clip-vit-large-patch14-336 ships), else the whole dict (a CLIPVisionModel's)."""
    if raw.get("model_type") == "clip":
        return raw.get("vision_config") or {}, where + ": vision_config"
    return raw, where


def clip_folder_places(root: Path, name: str = CLIP_FOLDER) -> list[Path]:
    """Where a CLIP folder downloaded next to a model is looked for: inside it, then beside it."""
    return [root / name, root.parent / name]
