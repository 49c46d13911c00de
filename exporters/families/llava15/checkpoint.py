"""LLaVA-1.5 checkpoint folders in both published layouts, and their maps onto our modules.

Why: LLaVA loads its own checkpoint with transformers' warnings for unexpected keys and its
vision tower from a second folder; llava-hf renamed every key once, and transformers renamed them
again later. Here every key is mapped through one table per module (a key prefix per layout),
on a commented ignore list, or an error; shapes are checked against the configs before any
tensor is read, and pickles are read with ``weights_only`` (core/checkpoints.py).

``--checkpoint DIR`` is the model folder as downloaded, in either layout.

Original LLaVA (``liuhaotian/llava-v1.5-7b``, ``LlavaLlamaForCausalLM``)::

    DIR/
      config.json          Llama fields + mm_vision_tower, mm_projector_type "mlp2x_gelu",
                           mm_vision_select_layer -2, mm_vision_select_feature "patch",
                           image_aspect_ratio "pad", mm_use_im_start_end false
      tokenizer.model      (+ tokenizer_config.json, whose "legacy" flag is honoured)
      pytorch_model-0000k-of-0000n.bin + pytorch_model.bin.index.json, or *.safetensors [+ index]:
                           model.embed_tokens.weight, model.layers.N.*, model.norm.weight,
                           lm_head.weight, model.mm_projector.{0,2}.{weight,bias}
      clip-vit-large-patch14-336/
                           the tower's own Hugging Face folder (openai/clip-vit-large-patch14-336),
                           named like the last part of mm_vision_tower; DIR/../<name>/ works too:
                           config.json (CLIPModel or CLIPVisionModel), pytorch_model.bin or
                           model.safetensors with vision_model.* keys

llava-hf (``llava-hf/llava-1.5-7b-hf``, ``LlavaForConditionalGeneration``)::

    DIR/
      config.json          text_config (Llama), vision_config (CLIP), vision_feature_layer -2,
                           vision_feature_select_strategy "default", image_token_index 32000
      tokenizer.model      (+ tokenizer_config.json)
      model-0000k-of-0000n.safetensors + model.safetensors.index.json, or model.safetensors:
        older keys  language_model.model.*, language_model.lm_head.weight,
                    multi_modal_projector.linear_{1,2}.*, vision_tower.vision_model.*
        newer keys  model.language_model.*, lm_head.weight,
                    model.multi_modal_projector.linear_{1,2}.*, model.vision_tower.vision_model.*
        (transformers 5 saves the tower without the ``vision_model.`` level)

The vocabulary is config.json's (32064 rows in llava-hf: ``<image>`` is 32000, ``<pad>`` 32001);
the runtime splices image embeddings and never feeds the image token. Key names and shapes:
the architecture reference (model-architectures.md), section 3.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from vlm2om.graphs.clip_vit import ClipVisionConfig, ClipVisionTower
from vlm2om.graphs.llama import LlamaConfig
from vlm2om.graphs.projector import MlpGeluProjector, MlpGeluProjectorConfig

from vlm2om.exporters.core.checkpoints import (HF_WEIGHT_FILES, CheckpointError, Ignore, LoadReport, MappingTable, Plan,
                                               SizeCheck, TensorSource, check_plans, count_indexed, coverage_plan, dim,
                                               expected_shapes, load_plans, on_meta, open_hf_folder, size_hint)
from vlm2om.exporters.core import clip_weights as cw
from vlm2om.exporters.core.clip_weights import CLIP_FOLDER
from vlm2om.exporters.llm.llama_weights import (LLAMA_DEFAULTS, LlamaKeys, llama_config, llm_plan, llm_size_hint,
                                                read_json)

# Keys of an OpenAI CLIP folder (CLIPModel) outside the vision transformer.
CLIP_MODEL_IGNORE = (
    Ignore(r"text_model\..+", "CLIP's text tower: LLaVA uses the vision tower only"),
    Ignore(r"(text|visual)_projection\.weight", "CLIP's contrastive projections: unused by LLaVA"),
    Ignore(r"logit_scale", "CLIP's contrastive temperature"))


@dataclass(frozen=True)
class LlavaCheckpoint:
    """A LLaVA-1.5 folder understood from its config.json and key names (no tensor read)."""

    layout: str  # "llava" (original) or "llava-hf"
    root: Path
    vision_dir: Path  # the folder holding the tower: the CLIP folder, or root for llava-hf
    vision_prefix: str  # the tower's key prefix there
    projector_keys: tuple[str, str]  # prefixes of the two Linear layers
    llm_keys: LlamaKeys
    llama: LlamaConfig
    vision: ClipVisionConfig
    projector: MlpGeluProjectorConfig
    pad_to_square: bool
    legacy: bool
    image_token_index: int | None

    @property
    def tokenizer_model(self) -> Path:
        return self.root / "tokenizer.model"


_UNUSED = "past hidden_states[select_layer]: never affects LLaVA's features"


def _vision_ignore(prefix: str, cfg: ClipVisionConfig) -> tuple[Ignore, ...]:
    return cw.clip_ignore(prefix, cfg, _UNUSED)


def clip_table(prefix: str, cfg: ClipVisionConfig) -> MappingTable:
    return cw.clip_table(prefix, cfg, _UNUSED)


def projector_table(keys: tuple[str, str]) -> MappingTable:
    """linear_1 / linear_2 of mlp2x_gelu: ``model.mm_projector.{0,2}`` originally (index 1 is the
    parameter-free GELU), ``[model.]multi_modal_projector.linear_{1,2}`` in llava-hf."""
    return MappingTable(tuple((f"linear_{n}.{p}", f"{k}{p}") for n, k in zip((1, 2), keys) for p in ("weight", "bias")))


def clip_config(raw: dict, where: str, select_layer: int, keep_cls: bool) -> ClipVisionConfig:
    return cw.clip_config(raw, where, select_layer, keep_cls, "LLaVA-1.5")


def _prefix(source: TensorSource, candidates: list[str], probe: str, what: str) -> str:
    keys = set(source.keys())
    for p in candidates:
        if p + probe in keys:
            return p
    raise CheckpointError(f"{source.name}: no {what} found (looked for "
                          f"{', '.join(repr(p + probe) for p in candidates)})")


def _legacy(root: Path) -> bool:
    """tokenizer_config.json's flag; transformers' Llama tokenizer treats an absent one as legacy."""
    path = root / "tokenizer_config.json"
    return bool(read_json(path, "tokenizer config").get("legacy", True)) if path.is_file() else True


def _require(root: Path, extra: list[str]) -> None:
    missing = [f"{root / 'tokenizer.model'}"] if not (root / "tokenizer.model").is_file() else []
    if not any((root / n).is_file() for n in HF_WEIGHT_FILES):
        missing.append(f"{root}/ weights (one of {', '.join(HF_WEIGHT_FILES)})")
    missing += extra
    if missing:
        raise CheckpointError(f"{root}: incomplete LLaVA-1.5 checkpoint directory; missing:\n"
                              + "\n".join(f"  - {m}" for m in missing))


def _original(root: Path, raw: dict, where: str) -> LlavaCheckpoint:
    """LlavaLlamaForCausalLM: the LLM and projector here, the tower in its own CLIP folder."""
    arch = " ".join(raw.get("architectures") or []).lower()
    if raw.get("model_type") not in ("llava", "llava_llama") and "llavallama" not in arch:
        raise CheckpointError(f"{where}: model_type {raw.get('model_type')!r}; "
                              "only LLaVA with a Llama LLM is supported")
    checks = {"mm_projector_type": "mlp2x_gelu", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
              "mm_patch_merge_type": "flat"}
    for key, want in checks.items():
        if raw.get(key, want) != want:
            raise CheckpointError(f"{where}: {key}={raw[key]!r}; LLaVA-1.5 uses {want!r} (the only one supported)")
    if raw.get("image_aspect_ratio") == "anyres":
        raise CheckpointError(f"{where}: image_aspect_ratio 'anyres' is LLaVA-1.6's; only LLaVA-1.5 is supported")
    if "mm_vision_select_layer" not in raw:
        raise CheckpointError(f"{where}: missing mm_vision_select_layer (LLaVA-1.5 uses -2)")
    feature = raw.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise CheckpointError(f"{where}: mm_vision_select_feature={feature!r} is not supported")
    name = Path(str(raw.get("mm_vision_tower", CLIP_FOLDER))).name
    places = [root / name, root.parent / name]
    clip_dir = next((p for p in places if (p / "config.json").is_file()), None)
    _require(root, [] if clip_dir else [f"{places[0]}/ (or {places[1]}/): the vision tower's Hugging Face "
                                        f"folder ({raw.get('mm_vision_tower')}) with config.json and weights"])
    clip_raw = read_json(clip_dir / "config.json", "CLIP config")
    clip_where = str(clip_dir / "config.json")
    if clip_raw.get("model_type") == "clip":
        clip_raw, clip_where = clip_raw.get("vision_config") or {}, clip_where + ": vision_config"
    vision = clip_config(clip_raw, clip_where, raw["mm_vision_select_layer"], feature == "cls_patch")
    llama = llama_config(raw, where)
    if int(raw.get("mm_hidden_size", vision.width)) != vision.width:
        raise CheckpointError(f"{where}: mm_hidden_size={raw['mm_hidden_size']}, "
                              f"but the CLIP tower is {vision.width} wide")
    prefix = _prefix(open_hf_folder(clip_dir), ["vision_model.", ""], "embeddings.patch_embedding.weight",
                     "CLIP vision tower")
    return LlavaCheckpoint("llava", root, clip_dir, prefix, ("model.mm_projector.0.", "model.mm_projector.2."),
                           LlamaKeys(tied=bool(raw.get("tie_word_embeddings"))), llama, vision,
                           MlpGeluProjectorConfig(vision.width, llama.hidden),
                           raw.get("image_aspect_ratio") == "pad", _legacy(root), None)


def _hf(root: Path, raw: dict, where: str) -> LlavaCheckpoint:
    """LlavaForConditionalGeneration: everything in one folder, under one of two key schemes."""
    text, vis = raw.get("text_config") or {}, raw.get("vision_config") or {}
    if text.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{where}: text_config model_type {text['model_type']!r}; only a Llama LLM is supported")
    layer, strategy = raw.get("vision_feature_layer", -2), raw.get("vision_feature_select_strategy", "default")
    if not isinstance(layer, int) or strategy not in ("default", "full"):
        raise CheckpointError(f"{where}: vision_feature_layer={layer!r} / select_strategy={strategy!r} not supported")
    if raw.get("projector_hidden_act", "gelu") != "gelu" or raw.get("multimodal_projector_bias", True) is False:
        raise CheckpointError(f"{where}: the projector must be mlp2x_gelu with biases (projector_hidden_act 'gelu')")
    _require(root, [])
    vision = clip_config(vis, where + ": vision_config", layer, strategy == "full")
    # Older llava-hf configs keep the resized vocabulary (32064) at the top level as well.
    llama = llama_config(text, where + ": text_config", {**LLAMA_DEFAULTS, "vocab_size": raw.get("vocab_size", 32000)})
    source = open_hf_folder(root)
    names = source.keys()
    if any(k.startswith("language_model.model.") for k in names):
        llm = LlamaKeys("language_model.model.", "language_model.lm_head.weight")
        base, proj = "", "multi_modal_projector."
    elif any(k.startswith("model.language_model.") for k in names):
        llm = LlamaKeys("model.language_model.", "lm_head.weight")
        base, proj = "model.", "model.multi_modal_projector."
    else:
        raise CheckpointError(f"{source.name}: neither llava-hf key scheme (language_model.model.* or "
                              "model.language_model.*) is present; is this a llava-hf checkpoint?")
    tied = bool(raw.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
    tower = f"{base}vision_tower."
    prefix = _prefix(source, [tower + "vision_model.", tower], "embeddings.patch_embedding.weight", "vision tower")
    index = raw.get("image_token_index", raw.get("image_token_id"))
    return LlavaCheckpoint("llava-hf", root, root, prefix, (f"{proj}linear_1.", f"{proj}linear_2."),
                           LlamaKeys(llm.model, llm.lm_head, tied), llama, vision,
                           MlpGeluProjectorConfig(vision.width, llama.hidden), True, _legacy(root),
                           None if index is None else int(index))


def open_checkpoint(root: str | Path) -> LlavaCheckpoint:
    """Read config.json (and the CLIP folder's) and the key names; the layout follows from them."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint directory not found")
    path = root / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{root}: no config.json; expected a LLaVA-1.5 model folder (original or llava-hf)")
    raw = read_json(path)
    if "text_config" in raw or "LlavaForConditionalGeneration" in (raw.get("architectures") or []):
        return _hf(root, raw, str(path))
    if "mm_vision_tower" in raw or "mm_projector_type" in raw:
        return _original(root, raw, str(path))
    raise CheckpointError(f"{path}: neither an original LLaVA config (mm_vision_tower, mm_projector_type) "
                          "nor a llava-hf one (text_config, vision_config)")


def vision_plans(ck: LlavaCheckpoint, check_unmapped: bool | None = None) -> list[Plan]:
    """The tower; a CLIP folder of its own is checked key by key here (text tower ignored)."""
    want = expected_shapes(on_meta(lambda: ClipVisionTower(ck.vision)))
    own = ck.vision_dir != ck.root
    table = clip_table(ck.vision_prefix, ck.vision) + MappingTable((), CLIP_MODEL_IGNORE if own else ())
    return [table.plan(open_hf_folder(ck.vision_dir), want, {"i": range(ck.vision.built_layers)},
                       own if check_unmapped is None else check_unmapped)]


def projector_plans(ck: LlavaCheckpoint, source: TensorSource | None = None) -> list[Plan]:
    want = expected_shapes(on_meta(lambda: MlpGeluProjector(ck.projector)))
    return [projector_table(ck.projector_keys).plan(source or open_hf_folder(ck.root), want, check_unmapped=False)]


def check_checkpoint(ck: LlavaCheckpoint) -> list[str]:
    """Every key and shape of every file, no tensor read; raises naming every problem, else
    returns the ignored keys (for the export log)."""
    source = open_hf_folder(ck.root)
    plans = [llm_plan(source, ck.llama, ck.llm_keys, check_unmapped=False), *projector_plans(ck, source)]
    ignore = list(ck.llm_keys.ignore)
    if ck.layout == "llava":
        tower = vision_plans(ck)  # its own folder, fully checked
        # delay_load: LLaVA builds the tower empty, drops these keys, then loads the CLIP folder.
        ignore.append(Ignore(r"model\.vision_tower\..+", "tower copy: LLaVA loads it from the CLIP folder"))
    else:
        tower = []
        plans += vision_plans(ck, check_unmapped=False)
        ignore += _vision_ignore(ck.vision_prefix, ck.vision)
    cover = coverage_plan(source, plans, ignore)
    check_plans([*plans, cover, *tower], f"the LLaVA-1.5 checkpoint ({ck.layout} layout)",
                lambda: [llm_size_hint(source, ck.llama, ck.llm_keys, f"read from {ck.root / 'config.json'}"),
                         vision_size_hint(ck)])
    return [f"{p.source.name}: {k} ({why})" for p in (cover, *tower) for k, why in p.ignored]


def vision_size_hint(ck: LlavaCheckpoint) -> str | None:
    """The CLIP tower's sizes its shapes tell against its config's."""
    source, p, cfg = open_hf_folder(ck.vision_dir), ck.vision_prefix, ck.vision
    origin = f"read from {ck.vision_dir / 'config.json'}" + (": vision_config" if ck.layout == "llava-hf" else "")
    patch = f"{p}embeddings.patch_embedding.weight"
    return size_hint("CLIP tower", [
        SizeCheck("width {}", cfg.width, dim(source, patch, 0)),
        SizeCheck("{} layers", cfg.layers, count_indexed(source.keys(), re.escape(p) + r"encoder\.layers\.(\d+)\.")),
        SizeCheck("patch size {}", cfg.patch_size, dim(source, patch, 3)),
        SizeCheck("{} positions", cfg.grid ** 2 + 1, dim(source, f"{p}embeddings.position_embedding.weight", 0)),
        SizeCheck("MLP size {}", cfg.mlp_dim, dim(source, f"{p}encoder.layers.0.mlp.fc1.weight", 0))], origin)


def vision_state(ck: LlavaCheckpoint, dtype: torch.dtype | None = None) -> LoadReport:
    """State for ``ClipVisionTower(ck.vision)``."""
    return load_plans(vision_plans(ck, check_unmapped=False), dtype, "the LLaVA vision tower")


def projector_state(ck: LlavaCheckpoint, dtype: torch.dtype | None = None) -> LoadReport:
    """State for ``MlpGeluProjector(ck.projector)``."""
    return load_plans(projector_plans(ck), dtype, "the LLaVA projector")
