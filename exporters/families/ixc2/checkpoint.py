"""InternLM-XComposer2-VL-7B and -4KHD-7B checkpoint folders, and their maps onto our modules.

Why: the remote code loads these folders with transformers' silent key matching, builds its
vision tower from a second folder (OpenAI's CLIP-336) and then resizes or keeps its position table,
and hard-codes the PLoRA ranks and alphas. Here every key is mapped through a table, on a
commented ignore list, or an error; shapes are checked before any tensor is read; the variant, the
LoRA ranks and the position table's size are read from the weights' shapes, not assumed::

    DIR/ (internlm/internlm-xcomposer2-vl-7b or internlm/internlm-xcomposer2-4khd-7b)
      config.json       InternLM2 fields (llm/internlm2_weights.py), VL: img_size (default 490)
      tokenizer.model   InternLM2's SentencePiece, with [UNUSED_TOKEN_145] / [UNUSED_TOKEN_146]
      pytorch_model-0000k-of-0000n.bin + pytorch_model.bin.index.json, or model*.safetensors [+ index]:
        model.*, output.weight           the InternLM2 with PLoRA (internlm2_weights.XCOMPOSER2)
        vit.vision_tower.vision_model.*  the fine-tuned CLIP tower (post_layernorm unused)
        vision_proj.{0,2}.{weight,bias}  VL: 1024 -> 4096 -> 4096; 4KHD: 4096 -> 4096 -> 4096
        plora_glb_GN [1,1,4096], plora_sub_GN [1,1,1,4096]   4KHD only
      adapter_config.json  optional: the LoRA alphas (PEFT's fields r, lora_alpha, rank_pattern, alpha_pattern)
      clip-vit-large-patch14-336/config.json   sizes the tower (or DIR/../, or --clip; weights never read)

Both variants take ``hidden_states[-1]`` (every layer, no post_layernorm) without CLS. VL runs the
tower at img_size: a table of (img_size/14)^2+1 rows is used as is; one of the CLIP folder's size
(577 rows) is resized as the original's ``resize_pos`` does (bicubic, rounded to fp16). 4KHD runs
it at the CLIP folder's size. Reference: model-architectures.md section 4.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.nn import functional as F

from vlm2om.graphs.clip_vit import ClipVisionConfig, ClipVisionTower
from vlm2om.graphs.internlm2 import LORA_KINDS, InternLM2Config, lora_table
from vlm2om.graphs.ixc2_vision import HdViewConfig, HdViewProjector
from vlm2om.graphs.projector import MlpGeluProjector, MlpGeluProjectorConfig

from vlm2om.exporters.core import clip_weights as cw
from vlm2om.exporters.core.checkpoints import (HF_WEIGHT_FILES, CheckpointError, LoadReport, MappingTable, Plan,
                                               SizeCheck, TensorSource, check_plans, count_indexed, coverage_plan, dim,
                                               expected_shapes, load_plans, on_meta, open_hf_folder, size_hint)
from vlm2om.exporters.core.preflight import piece_ids, read_json
from vlm2om.exporters.llm import internlm2_weights as iw

VIT = "vit.vision_tower.vision_model."
PROJ = ("vision_proj.0.", "vision_proj.2.")  # index 1 is the parameter-free GELU of its nn.Sequential
GN = ("plora_glb_GN", "plora_sub_GN")
TITLES = {"vl": "InternLM-XComposer2-VL", "4khd": "InternLM-XComposer2-4KHD"}
FAMILY_NAMES = {"vl": "ixc2-vl", "4khd": "ixc2-4khd"}
DEFAULT_IMG_SIZE = 490  # the VL processor's Resize((img_size, img_size)); 35 x 35 patches
# openai/clip-vit-large-patch14-336's published vision_config, when no CLIP folder is at hand.
CLIP_L14_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
# The original's PLoRA(lora_r, lora_alpha) per variant, for folders without adapter_config.json.
PLORA_CONSTANTS = {"vl": lora_table((256, 256)), "4khd": lora_table((256, 256), wqkv=(8, 16))}
ADAPTER_CONFIG = "adapter_config.json"
CHAT_PIECES = ("[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]")  # ends / begins a chat message
_UNUSED = "after hidden_states[-1]: never affects InternLM-XComposer2's features"


@dataclass(frozen=True)
class Ixc2Checkpoint:
    """A folder understood from its configs and key shapes (no tensor read)."""

    root: Path
    variant: str
    layout: str  # "bin" | "safetensors", "+ index" when sharded
    llm: InternLM2Config
    vision: ClipVisionConfig  # at the size the tower runs (VL: img_size)
    projector: MlpGeluProjectorConfig | HdViewConfig
    position_rows: int  # the checkpoint's position table; != vision.num_positions: resized on load
    provenance: dict  # clip config, positions, LoRA r/alpha and where from, ids (for Ixc2Parts.source)

    def open(self) -> TensorSource:
        return open_hf_folder(self.root)

    @property
    def tokenizer_model(self) -> Path:
        return self.root / "tokenizer.model"

    @property
    def resized(self) -> bool:
        return self.position_rows != self.vision.num_positions


# --- config ----------------------------------------------------------------------------------

def _require(root: Path) -> None:
    missing = [] if (root / "config.json").is_file() else [f"{root / 'config.json'}"]
    if not (root / "tokenizer.model").is_file():
        missing.append(f"{root / 'tokenizer.model'} (InternLM2's SentencePiece model)")
    if not any((root / n).is_file() for n in HF_WEIGHT_FILES):
        missing.append(f"{root}/ weights (one of {', '.join(HF_WEIGHT_FILES)})")
    if missing:
        raise CheckpointError(f"{root}: incomplete InternLM-XComposer2 checkpoint folder; missing:\n"
                              + "\n".join(f"  - {m}" for m in missing))


def _identify(raw: dict, where: str) -> None:
    names = " ".join([str(raw.get("model_type", "")), *map(str, raw.get("architectures") or [])]).lower()
    if re.search(r"xcomposer2(d5|_5|\.5)", names):
        raise CheckpointError(f"{where}: an InternLM-XComposer2.5 model ({names.strip()}); only XComposer2 "
                              "(VL-7B, 4KHD-7B) is supported")
    if "xcomposer2" not in names and "internlm2" not in names:
        raise CheckpointError(f"{where}: model_type {raw.get('model_type')!r}, architectures "
                              f"{raw.get('architectures')}: not an InternLM-XComposer2 config")


def clip_tower(root: Path, clip: str | Path | None) -> tuple[ClipVisionConfig, str]:
    """The tower's sizes at the CLIP folder's image size, and where they came from."""
    places = [Path(clip)] if clip is not None else cw.clip_folder_places(root)
    folder = next((p for p in places if (p / "config.json").is_file()), None)
    if folder is None and clip is not None:
        raise CheckpointError(f"--clip {clip}: no config.json there")
    if folder is None:
        raw, where = CLIP_L14_336, (f"CLIP ViT-L/14-336's published config (no {cw.CLIP_FOLDER}/config.json at "
                                    f"{places[0]} or {places[1]})")
    else:
        raw, where = cw.vision_section(read_json(folder / "config.json", "CLIP config"), str(folder / "config.json"))
    return cw.clip_config(raw, where, -1, False, "InternLM-XComposer2"), where


def detect_variant(source: TensorSource, width: int) -> tuple[str, str]:
    """("vl" | "4khd", the evidence) from the keys: the separators, or vision_proj.0's input width."""
    names = set(source.keys())
    proj_in = dim(source, f"{PROJ[0]}weight", 1)
    if GN[0] in names:
        return "4khd", f"it has {GN[0]}"
    if proj_in == 4 * width:
        return "4khd", f"its {PROJ[0]}weight takes {proj_in} = 4 x {width} inputs (the 2x2 merge)"
    return "vl", f"it has no {GN[0]} and its {PROJ[0]}weight takes {proj_in} inputs"


def _img_size(raw: dict, where: str, patch: int) -> int:
    value = raw.get("img_size", DEFAULT_IMG_SIZE)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % patch:
        raise CheckpointError(f"{where}: img_size={value!r}; expected a positive multiple of the patch size {patch}")
    return value


def _patterned(adapter: dict, field: str, base: str, kind: str, layers: int, where: str):
    """(value, origin) of one kind from PEFT's ``*_pattern`` (regex on module names, as PEFT matches
    them) or the base field; one value for every layer, else an error."""
    patterns = adapter.get(field) or {}
    seen: dict[str, tuple] = {}  # repr -> (value, origin): JSON values need not be hashable
    for i in range(layers):
        name = f"model.layers.{i}.{iw.LORA_PATHS[kind]}"
        try:
            hits = [v for k, v in patterns.items() if re.fullmatch(rf"(?:.*\.)?(?:{k})", name)]
        except re.error as err:
            raise CheckpointError(f"{where}: {field} has a bad pattern ({err})") from None
        value = (hits[0], field) if hits else (adapter.get(base), base)
        seen.setdefault(repr(value[0]), value)
    if len(seen) > 1:
        raise CheckpointError(f"{where}: {field} gives {iw.LORA_PATHS[kind]} different values in different "
                              f"layers ({', '.join(sorted(seen))}); one per kind is supported")
    return next(iter(seen.values()))


def lora_settings(ranks: dict[str, int], variant: str, adapter: dict | None, where: str,
                  layers: int) -> tuple[tuple, dict]:
    """(InternLM2Config.lora, {kind: {r, alpha, alpha_from}}): ranks from the weights' shapes; alphas
    from adapter_config.json (``adapter``, read from ``where``), whose ranks must agree, else the
    original's constants, refused where a rank differs from theirs (the alpha is then unknown)."""
    info = {}
    if adapter is None:
        for kind, r, alpha in PLORA_CONSTANTS[variant]:
            if ranks[kind] != r:
                raise CheckpointError(
                    f"{where}: {iw.LORA_PATHS[kind]}.Plora_A has rank {ranks[kind]}, but the original "
                    f"{TITLES[variant]}'s PLoRA is r {r}, alpha {alpha}; without {ADAPTER_CONFIG} the alpha of "
                    f"these weights is unknown: add one to the folder, e.g. {{\"r\": {ranks[kind]}, \"lora_alpha\": "
                    f"..., \"rank_pattern\": {{...}}, \"alpha_pattern\": {{...}}}}")
            info[kind] = {"r": r, "alpha": alpha, "alpha_from": f"the original {TITLES[variant]}'s PLoRA constants"}
        return PLORA_CONSTANTS[variant], info
    for kind in LORA_KINDS:
        r, r_from = _patterned(adapter, "rank_pattern", "r", kind, layers, where)
        alpha, a_from = _patterned(adapter, "alpha_pattern", "lora_alpha", kind, layers, where)
        for name, value in ((r_from, r), (a_from, alpha)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                got = "missing" if value is None else f"{value!r}"
                raise CheckpointError(f"{where}: {name} for {iw.LORA_PATHS[kind]} is {got}; expected a positive number")
        if r != ranks[kind]:
            raise CheckpointError(f"{where}: {r_from} gives {iw.LORA_PATHS[kind]} rank {r}, but its Plora_A "
                                  f"weights have rank {ranks[kind]}: the adapter config does not match the weights")
        info[kind] = {"r": ranks[kind], "alpha": alpha, "alpha_from": f"{where}: {a_from}"}
    return lora_table(**{k: (ranks[k], info[k]["alpha"]) for k in LORA_KINDS}), info


def _layout(root: Path) -> str:
    name = next(n for n in HF_WEIGHT_FILES if (root / n).is_file())
    return ("safetensors" if "safetensors" in name else "bin") + (" + index" if name.endswith(".index.json") else "")


def open_checkpoint(root: str | Path, variant: str, clip: str | Path | None = None) -> Ixc2Checkpoint:
    """Read config.json, the CLIP config and the key shapes; refuse the other variant's folder."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint folder not found")
    if variant not in TITLES:
        raise ValueError(f"variant {variant!r}: choose from {tuple(TITLES)}")
    _require(root)
    path = root / "config.json"
    raw, where = read_json(path), str(path)
    _identify(raw, where)
    base, clip_from = clip_tower(root, clip)
    source = open_hf_folder(root)
    found, evidence = detect_variant(source, base.width)
    if found != variant:
        raise CheckpointError(f"{root} is an {TITLES[found]} checkpoint ({evidence}); export it as "
                              f"{FAMILY_NAMES[found]}, not {FAMILY_NAMES[variant]}")
    llm = iw.internlm2_config(raw, where, lora_table())
    adapter_path = root / ADAPTER_CONFIG
    adapter = read_json(adapter_path, "adapter config") if adapter_path.is_file() else None
    lora, lora_info = lora_settings(iw.lora_ranks(source, llm.layers), variant, adapter,
                                    str(adapter_path) if adapter else source.name, llm.layers)
    llm = replace(llm, lora=lora)
    vision = replace(base, image_size=_img_size(raw, where, base.patch_size)) if variant == "vl" else base
    rows = dim(source, VIT + cw.POSITIONS, 0) or vision.num_positions  # absent: the key check names it
    if rows not in (vision.num_positions, base.num_positions):
        raise CheckpointError(
            f"{source.name}: '{VIT}{cw.POSITIONS}' has {rows} rows; the tower at {vision.image_size} px needs "
            f"{vision.num_positions} ({'img_size in ' + where if variant == 'vl' else clip_from}), or, to be "
            f"resized from, the CLIP folder's {base.num_positions} ({base.image_size} px: {clip_from})")
    try:
        proj = MlpGeluProjectorConfig(vision.width, llm.hidden) if variant == "vl" else \
            HdViewConfig(vision.grid, vision.width, llm.hidden)
    except ValueError as err:
        raise CheckpointError(f"{clip_from}: {err}") from None
    positions = {"rows": rows, "resized": rows != vision.num_positions}
    if positions["resized"]:
        positions.update(to_rows=vision.num_positions, method="bicubic, align_corners=False, CLS row kept "
                         "(the original's resize_pos), rounded to float16")
    ids = {k: int(raw[f"{k}_token_id"]) if raw.get(f"{k}_token_id") is not None else d
           for k, d in (("bos", 1), ("eos", 2), ("pad", 0))}
    provenance = {"variant": variant, "clip_config": clip_from, "position_embedding": positions,
                  "lora": lora_info, "ids": ids, **({"img_size": vision.image_size} if variant == "vl" else {})}
    return Ixc2Checkpoint(root, variant, _layout(root), llm, vision, proj, rows, provenance)


# --- tables, plans, states -----------------------------------------------------------------------

def projector_table(variant: str) -> MappingTable:
    """MlpGeluProjector's linear_1/2 (VL), HdViewProjector's separators and proj.linear_1/2 (4KHD)."""
    head = "" if variant == "vl" else "proj."
    entries = tuple((f"{head}linear_{n}.{p}", f"{k}{p}") for n, k in zip((1, 2), PROJ) for p in ("weight", "bias"))
    return MappingTable(entries + ((("glb_GN", GN[0]), ("sub_GN", GN[1])) if variant == "4khd" else ()))


def projector_module(ck: Ixc2Checkpoint):
    """The (empty) VL MlpGeluProjector or 4KHD HdViewProjector of ``ck.projector``."""
    return MlpGeluProjector(ck.projector) if ck.variant == "vl" else HdViewProjector(ck.projector)


def vision_plan(ck: Ixc2Checkpoint, source: TensorSource) -> Plan:
    """The tower's keys; a table to be resized is expected at its own row count."""
    want = expected_shapes(on_meta(lambda: ClipVisionTower(ck.vision)))
    want[cw.POSITIONS] = torch.Size([ck.position_rows, ck.vision.width])
    return cw.clip_table(VIT, ck.vision, _UNUSED).plan(source, want, {"i": range(ck.vision.built_layers)},
                                                       check_unmapped=False)


def projector_plan(ck: Ixc2Checkpoint, source: TensorSource) -> Plan:
    want = expected_shapes(on_meta(lambda: projector_module(ck)))
    return projector_table(ck.variant).plan(source, want, check_unmapped=False)


def size_hints(ck: Ixc2Checkpoint, source: TensorSource):
    """The sizes the shapes tell against the configs' (asked for only when there are problems)."""
    def hints() -> list[str | None]:
        cfg, patch = ck.vision, f"{VIT}embeddings.patch_embedding.weight"
        proj_in = cfg.width if ck.variant == "vl" else 4 * cfg.width
        return [iw.llm_size_hint(source, ck.llm, iw.XCOMPOSER2, f"read from {ck.root / 'config.json'}"),
                size_hint("CLIP tower", [
                    SizeCheck("width {}", cfg.width, dim(source, patch, 0)),
                    SizeCheck("{} layers", cfg.layers,
                              count_indexed(source.keys(), re.escape(VIT) + r"encoder\.layers\.(\d+)\.")),
                    SizeCheck("patch size {}", cfg.patch_size, dim(source, patch, 3)),
                    SizeCheck("MLP size {}", cfg.mlp_dim, dim(source, f"{VIT}encoder.layers.0.mlp.fc1.weight", 0))],
                    ck.provenance["clip_config"]),
                size_hint("vision_proj", [
                    SizeCheck("input width {}", proj_in, dim(source, f"{PROJ[0]}weight", 1)),
                    SizeCheck("output width {}", ck.llm.hidden, dim(source, f"{PROJ[1]}weight", 0))],
                    "the tower's width and the LLM's hidden size")]
    return hints


def check_checkpoint(ck: Ixc2Checkpoint) -> list[str]:
    """Every key and shape of the folder, no tensor read; raises naming every problem, else
    returns the ignored keys (for the export log)."""
    source = ck.open()
    plans = [iw.llm_plan(source, ck.llm, iw.XCOMPOSER2, check_unmapped=False), vision_plan(ck, source),
             projector_plan(ck, source)]
    cover = coverage_plan(source, plans, (*iw.XCOMPOSER2.ignore, *cw.clip_ignore(VIT, ck.vision, _UNUSED)))
    check_plans([*plans, cover], f"the {TITLES[ck.variant]} checkpoint ({ck.layout})", size_hints(ck, source))
    return [f"{source.name}: {k} ({why})" for k, why in cover.ignored]


def resize_positions(table: torch.Tensor, grid: int, round_to: torch.dtype | None = torch.float16) -> torch.Tensor:
    """A [1 + g^2, C] position table as one of [1 + grid^2, C], as the original's ``resize_pos``:
    the CLS row kept, the patch rows as a [1, C, g, g] image resized bicubically (align_corners
    False, computed in fp32), then ``round_to`` (the original's ``.to(torch.float16)``; None: kept fp32)."""
    rows, width = table.shape
    g = math.isqrt(rows - 1)
    if g * g != rows - 1:
        raise ValueError(f"a position table of {rows} rows is not 1 + a square")
    x = table.float()
    patches = x[1:].reshape(1, g, g, width).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    out = torch.cat([x[:1], patches.permute(0, 2, 3, 1).reshape(grid * grid, width)])
    return out if round_to is None else out.to(round_to)


def vision_state(ck: Ixc2Checkpoint, dtype: torch.dtype | None = None) -> LoadReport:
    """State for ``ClipVisionTower(ck.vision)``, the position table resized where it needs to be."""
    report = load_plans([vision_plan(ck, ck.open())], dtype, f"the {TITLES[ck.variant]} vision tower")
    if ck.resized:
        table = report.state[cw.POSITIONS]
        report.state[cw.POSITIONS] = resize_positions(table, ck.vision.grid).to(dtype or table.dtype)
    return report


def projector_state(ck: Ixc2Checkpoint, dtype: torch.dtype | None = None) -> LoadReport:
    """State for the VL MlpGeluProjector or the 4KHD HdViewProjector of ``ck.projector``."""
    return load_plans([projector_plan(ck, ck.open())], dtype, f"the {TITLES[ck.variant]} vision_proj")


def chat_ids(ck: Ixc2Checkpoint, model: bytes) -> dict[str, int]:
    """The ids of the chat pieces in tokenizer.model (the prompt's ``specials``), refused if absent."""
    out = piece_ids(model, ck.tokenizer_model, CHAT_PIECES, "InternLM2's tokenizer.model")
    for piece, pid in out.items():
        if pid >= ck.llm.vocab_size:
            raise CheckpointError(f"{ck.tokenizer_model}: {piece} is id {pid}, beyond the model's "
                                  f"{ck.llm.vocab_size} embedding rows")
    return out
