"""VisualGLM-6B checkpoints in both published layouts, and the name maps onto our modules.

Why: the same weights ship as a Hugging Face remote-code folder and as a SwissArmyTransformer
(SAT) checkpoint, with the image encoder under different prefixes and the GLM's qkv rows in
different orders; neither loader checks much (HF's ``RotaryEmbedding`` even swallows its buffer).
Here every key is mapped, on a commented ignore list, or an error, before any tensor is read::

    Hugging Face THUDM/visualglm-6b/                 SAT (VisualGLMModel.from_pretrained)
      config.json   model_type chatglm, GLM sizes,     <dir>/latest         iteration number or "release"
                    eva_config, qformer_config,        <dir>/model_config.json  SAT args, eva_args,
                    image_length (SAT arg dicts)                            qformer_args, image_length
      pytorch_model-0000K-of-0000N.bin + index         <dir>/<latest>/mp_rank_00_model_states.pt
      ice_text.model, tokenizer_config.json                              = {'module': state_dict}
      image side: image_encoder.{vit,qformer,glm_proj}.*    mixins.eva.model.{vit,qformer,glm_proj}.*
      GLM: chatglm_weights.HF_KEYS                          chatglm_weights.SAT_KEYS

SAT ships no tokenizer: ``--tokenizer``, else ice_text.model in the checkpoint folder or the one
above it. Key names and shapes: model-architectures.md 2.2 and 2.5.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vlm2om.graphs.chatglm import ChatGLMConfig
from vlm2om.graphs.eva_vit import EvaVitConfig
from vlm2om.graphs.projector import LinearProjector, LinearProjectorConfig
from vlm2om.graphs.qformer import QFormerConfig
from vlm2om.graphs.sat_qformer import SatQFormer
from vlm2om.graphs.sat_vit import SatEvaVisionEncoder

from vlm2om.exporters.core.checkpoints import (HF_WEIGHT_FILES, CheckpointError, DictSource, MappingTable, Plan,
                                               SizeCheck, TensorSource, count_indexed, dim, expected_shapes,
                                               on_meta, open_hf_folder, size_hint)
from vlm2om.exporters.core.preflight import piece_ids, read_json
from vlm2om.exporters.llm import chatglm_weights as gw

TOKENIZER_FILE = "ice_text.model"
SAT_STATES = "mp_rank_00_model_states.pt"
# ChatGLMTokenizer(num_image_tokens=20000) in the HF remote code's tokenization_chatglm.py: the id
# offset where tokenizer_config.json does not set one. SAT's ids are the SentencePiece ids (offset 0).
HF_DEFAULT_ID_OFFSET = 20000


@dataclass(frozen=True)
class VisualGLMFiles:
    layout: str  # "hf" | "sat"
    root: Path  # the folder with config.json / model_config.json
    config: Path
    weights: Path  # the HF folder, or SAT's .pt file
    tokenizer: Path
    tokenizer_config: Path | None = None  # HF only

    @property
    def prefix(self) -> str:
        """Where the image encoder's BLIP2 module sits in the state dict."""
        return "image_encoder." if self.layout == "hf" else "mixins.eva.model."

    @property
    def glm_keys(self) -> gw.ChatGLMKeys:
        return gw.HF_KEYS if self.layout == "hf" else gw.SAT_KEYS

    def open(self) -> TensorSource:
        """The whole state dict (lazily: shards or an mmapped pickle), reopened by each builder."""
        return open_hf_folder(self.weights) if self.layout == "hf" else DictSource(self.weights, "module")


def find_files(path: str | Path, tokenizer: str | Path | None = None) -> VisualGLMFiles:
    """The layout at ``path`` (a folder of either layout, or SAT's .pt file itself)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".pt":
        root = next((d for d in (path.parent.parent, path.parent) if (d / "model_config.json").is_file()), None)
        if root is None:
            raise CheckpointError(f"{path}: no model_config.json in {path.parent.parent} or {path.parent} "
                                  "(a SAT checkpoint keeps it next to its 'latest' file)")
        return _sat_files(root, path, tokenizer)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint folder not found")
    if (path / "config.json").is_file():
        return _hf_files(path)
    if (path / "latest").is_file() or (path / "model_config.json").is_file():
        return _sat_files(path, _sat_states(path), tokenizer)
    raise CheckpointError(f"{path}: not a VisualGLM-6B checkpoint: expected a Hugging Face folder (config.json, "
                          f"{TOKENIZER_FILE}, pytorch_model*.bin) or a SAT folder (latest, model_config.json, "
                          f"<iteration>/{SAT_STATES})")


def _hf_files(root: Path) -> VisualGLMFiles:
    missing = [str(root / TOKENIZER_FILE)] if not (root / TOKENIZER_FILE).is_file() else []
    if not any((root / n).is_file() for n in HF_WEIGHT_FILES):
        missing.append(f"{root}/ weights (one of {', '.join(HF_WEIGHT_FILES)})")
    if missing:
        raise CheckpointError(f"{root}: incomplete VisualGLM-6B Hugging Face folder; missing:\n"
                              + "\n".join(f"  - {m}" for m in missing))
    tok_cfg = root / "tokenizer_config.json"
    return VisualGLMFiles("hf", root, root / "config.json", root, root / TOKENIZER_FILE,
                          tok_cfg if tok_cfg.is_file() else None)


def _sat_states(root: Path) -> Path:
    """``<root>/<latest>/mp_rank_00_model_states.pt`` as SAT's load_checkpoint finds it."""
    tracker = root / "latest"
    if not tracker.is_file():
        raise CheckpointError(f"{tracker}: missing (SAT's tracker file: an iteration number or 'release')")
    tag = tracker.read_text(encoding="utf-8", errors="replace").strip()
    if tag != "release" and not (tag.isdigit() and int(tag) > 0):
        raise CheckpointError(f"{tracker}: holds {tag[:40]!r}, not an iteration number or 'release'")
    states = root / (tag if tag == "release" else str(int(tag))) / SAT_STATES
    if not states.is_file():
        raise CheckpointError(f"{states}: missing (named by {tracker}: {tag!r}); a model-parallel checkpoint "
                              "must be merged into one rank first")
    return states


def _sat_files(root: Path, states: Path, tokenizer: str | Path | None) -> VisualGLMFiles:
    config = root / "model_config.json"
    if not config.is_file():
        raise CheckpointError(f"{config}: missing (SAT's model args)")
    if tokenizer is not None:
        tok = Path(tokenizer)
        if not tok.is_file():
            raise CheckpointError(f"--tokenizer {tok}: no such file")
    else:
        places = [root / TOKENIZER_FILE, root.parent / TOKENIZER_FILE]
        tok = next((p for p in places if p.is_file()), None)
        if tok is None:
            raise CheckpointError(f"{root}: a SAT checkpoint ships no tokenizer; looked for ChatGLM-6B's "
                                  f"{TOKENIZER_FILE} at {places[0]} and {places[1]}: give it with --tokenizer "
                                  "(the file from THUDM/chatglm-6b or THUDM/visualglm-6b)")
    return VisualGLMFiles("sat", root, config, states, tok)


# --- config: the GLM's sizes and ids, and the image side's SAT arg dicts -------------------------

@dataclass(frozen=True)
class VisualGLMConfig:
    glm: ChatGLMConfig
    ids: dict  # bos/eos/mask/gmask/pad as the config gives them
    vision: EvaVitConfig | None  # None where the config has no eva args
    qformer: QFormerConfig | None
    image_length: int | None


def read_config(files: VisualGLMFiles) -> VisualGLMConfig:
    """HF config.json (``eva_config``/``qformer_config``) or SAT model_config.json (``eva_args``/
    ``qformer_args``); the arg dicts are SAT ``get_args`` kwargs in both."""
    raw, where = read_json(files.config, "VisualGLM config"), str(files.config)
    if files.layout == "hf" and raw.get("model_type") != "chatglm":
        raise CheckpointError(f"{where}: not a ChatGLM model (model_type={raw.get('model_type')!r})")
    eva, qf = ("eva_config", "qformer_config") if files.layout == "hf" else ("eva_args", "qformer_args")
    vision = eva_config(raw[eva], f"{where} {eva}") if raw.get(eva) else None
    qformer = qformer_config(raw[qf], f"{where} {qf}") if raw.get(qf) else None
    length = raw.get("image_length")
    if qformer is not None and length is not None and int(length) != qformer.num_query:
        raise CheckpointError(f"{where}: image_length={length}, but the Q-Former has {qformer.num_query} queries")
    return VisualGLMConfig(gw.chatglm_config(raw, where), gw.special_ids(raw, where), vision, qformer,
                           None if length is None else int(length))


def _refuse(args: dict, where: str, expect: dict) -> None:
    for key, want in expect.items():
        if key in args and args[key] != want:
            raise CheckpointError(f"{where}: {key}={args[key]!r}; VisualGLM's graphs are built for {want!r}")


def _need(args: dict, key: str, where: str) -> int:
    if args.get(key) is None:
        raise CheckpointError(f"{where}: missing field {key}")
    return int(args[key])


def eva_config(args: dict, where: str) -> EvaVitConfig:
    """EvaVitConfig from VisualGLM's eva args (SAT ViTModel: pre-LN, CLS as vocab row 0, no final LN)."""
    _refuse(args, where, {"layernorm_order": "pre", "use_final_layernorm": False, "vocab_size": 1,
                          "pre_len": 1, "post_len": 0, "in_channels": 3})
    size = args.get("image_size", 224)
    size = list(size) if isinstance(size, (list, tuple)) else [size, size]
    if len(size) != 2 or size[0] != size[1]:
        raise CheckpointError(f"{where}: image_size={args.get('image_size')!r}; a square image is expected")
    width = _need(args, "hidden_size", where)
    return EvaVitConfig(image_size=int(size[0]), patch_size=int(args.get("patch_size", 14)), width=width,
                        depth=_need(args, "num_layers", where), heads=_need(args, "num_attention_heads", where),
                        mlp_dim=int(args.get("inner_hidden_size") or 4 * width),
                        eps=float(args.get("layernorm_epsilon") or 1e-5))  # SAT's default eps


def qformer_config(args: dict, where: str) -> QFormerConfig:
    """QFormerConfig from VisualGLM's qformer args (SAT BaseModel: post-LN, queries as vocab rows,
    cross-attention where ``is_decoder``, which must be every k-th layer from 0)."""
    _refuse(args, where, {"layernorm_order": "post"})
    layers, hidden = _need(args, "num_layers", where), _need(args, "hidden_size", where)
    cross = args.get("is_decoder")
    flags = list(cross) if isinstance(cross, (list, tuple)) else [bool(cross)] * layers
    on = [i for i, f in enumerate(flags) if f]
    every = (on[1] - on[0]) if len(on) > 1 else layers
    if len(flags) != layers or not on or flags != [i % every == 0 for i in range(layers)]:
        raise CheckpointError(f"{where}: is_decoder={cross!r}; our Q-Former cross-attends on every k-th layer "
                              "from layer 0")
    width = args.get("cross_attn_hidden_size")
    return QFormerConfig(hidden=hidden, layers=layers, heads=_need(args, "num_attention_heads", where),
                         ffn=int(args.get("inner_hidden_size") or 4 * hidden),
                         encoder_width=int(width) if width else hidden, num_query=_need(args, "vocab_size", where),
                         cross_every=every, eps=float(args.get("layernorm_epsilon") or 1e-5))


# --- the tokenizer: its <sop>/<eop> ids against the config's --------------------------------------

def id_offset(files: VisualGLMFiles) -> tuple[int, str]:
    """(ChatGLM's ``num_image_tokens``, where it came from)."""
    if files.layout == "sat":
        return 0, "SAT uses the SentencePiece ids"
    if files.tokenizer_config is None:
        return HF_DEFAULT_ID_OFFSET, "no tokenizer_config.json: ChatGLMTokenizer's default"
    value = read_json(files.tokenizer_config, "tokenizer config").get("num_image_tokens")
    if value is None:
        return HF_DEFAULT_ID_OFFSET, f"{files.tokenizer_config} sets no num_image_tokens: ChatGLMTokenizer's default"
    return int(value), f"num_image_tokens in {files.tokenizer_config}"


def check_tokenizer(files: VisualGLMFiles, model: bytes, ids: dict, offset: int, origin: str) -> tuple[int, int]:
    """(bos, eos) model ids: ``<sop>``/``<eop>`` + ``offset`` must be the config's bos/eos ids
    (SAT's config has no eos id: then the tokenizer's is taken)."""
    pieces = piece_ids(model, files.tokenizer, ("<sop>", "<eop>"), f"ChatGLM-6B's {TOKENIZER_FILE}")
    got = {}
    for name, piece in (("bos", "<sop>"), ("eos", "<eop>")):
        pid = pieces[piece]
        got[name] = pid + offset
        want = ids.get(f"{name}")
        if want is not None and got[name] != want:
            raise CheckpointError(
                f"{files.tokenizer}: {piece} is piece {pid}, + id offset {offset} ({origin}) = {got[name]}, but "
                f"{files.config} says {name}_token_id {want}: the tokenizer does not belong to this model")
    return got["bos"], got["eos"]


# --- the image side's tables (one prefix per layout) --------------------------------------------

_SAT_LAYER = gw.LAYER_LEAVES
_SAT_CROSS = tuple(f"{m}.{p}" for m in ("cross_attention.query", "cross_attention.key_value",
                                        "cross_attention.dense", "post_cross_attention_layernorm")
                   for p in ("weight", "bias"))


def vit_table(prefix: str) -> MappingTable:
    """SatEvaVisionEncoder <- SAT ViTModel (EVAViT: cls mixin replaced by ln_vision)."""
    v = f"{prefix}vit."
    return MappingTable((
        ("word_embeddings.weight", f"{v}transformer.word_embeddings.weight"),  # [1, W]: the CLS token
        ("position_embeddings.weight", f"{v}transformer.position_embeddings.weight"),  # [257, W]
        ("patch_embedding.proj.weight", f"{v}mixins.patch_embedding.proj.weight"),
        ("patch_embedding.proj.bias", f"{v}mixins.patch_embedding.proj.bias"),
        ("ln_vision.weight", f"{v}mixins.cls.ln_vision.weight"),
        ("ln_vision.bias", f"{v}mixins.cls.ln_vision.bias"),
    ) + tuple((f"layers.{{i}}.{s}", f"{v}transformer.layers.{{i}}.{s}") for s in _SAT_LAYER))


def qformer_table(prefix: str) -> MappingTable:
    """SatQFormer <- SAT BaseModel; the cross-attention entries match the even layers only."""
    q = f"{prefix}qformer.transformer."
    return MappingTable((
        ("word_embeddings.weight", f"{q}word_embeddings.weight"),  # [32, 768]: the query tokens
        ("final_layernorm.weight", f"{q}final_layernorm.weight"),
        ("final_layernorm.bias", f"{q}final_layernorm.bias"),
    ) + tuple((f"layers.{{i}}.{s}", f"{q}layers.{{i}}.{s}") for s in _SAT_LAYER + _SAT_CROSS))


def projector_table(prefix: str) -> MappingTable:
    return MappingTable((("proj.weight", f"{prefix}glm_proj.weight"),  # [4096, 768]
                         ("proj.bias", f"{prefix}glm_proj.bias")))


def vision_plan(source: TensorSource, files: VisualGLMFiles, cfg: EvaVitConfig,
                blocks: tuple[int, int] | None = None) -> Plan:
    """One slice (or the whole ViT) of a source shared with the other tables (no unmapped check)."""
    start, stop = blocks or (0, cfg.depth)
    want = expected_shapes(on_meta(lambda: SatEvaVisionEncoder(cfg, (start, stop))))
    return vit_table(files.prefix).plan(source, want, {"i": {j: start + j for j in range(stop - start)}},
                                        check_unmapped=False)


def qformer_plan(source: TensorSource, files: VisualGLMFiles, cfg: QFormerConfig) -> Plan:
    want = expected_shapes(on_meta(lambda: SatQFormer(cfg)))
    return qformer_table(files.prefix).plan(source, want, {"i": range(cfg.layers)}, check_unmapped=False)


def projector_plan(source: TensorSource, files: VisualGLMFiles, cfg: LinearProjectorConfig) -> Plan:
    want = expected_shapes(on_meta(lambda: LinearProjector(cfg)))
    return projector_table(files.prefix).plan(source, want, check_unmapped=False)


def size_hints(source: TensorSource, files: VisualGLMFiles, vcfg: EvaVitConfig, qcfg: QFormerConfig,
               pcfg: LinearProjectorConfig, glm: ChatGLMConfig,
               origins: dict[str, str]) -> Callable[[], list[str | None]]:
    """The sizes the shapes tell against the configs' (asked for only when there are problems)."""
    def hints() -> list[str | None]:
        v, q = f"{files.prefix}vit.", f"{files.prefix}qformer.transformer."
        vl, ql = f"{v}transformer.layers.0.", f"{q}layers.0."
        return [
            gw.llm_size_hint(source, glm, files.glm_keys, origins["glm"]),
            size_hint("EVA ViT", [
                SizeCheck("width {}", vcfg.width, dim(source, f"{v}transformer.word_embeddings.weight", 1)),
                SizeCheck("{} layers", vcfg.depth,
                          count_indexed(source.keys(), re.escape(v) + r"transformer\.layers\.(\d+)\.")),
                SizeCheck("patch size {}", vcfg.patch_size, dim(source, f"{v}mixins.patch_embedding.proj.weight", 3)),
                SizeCheck("{} position embeddings", vcfg.num_tokens,
                          dim(source, f"{v}transformer.position_embeddings.weight", 0)),
                SizeCheck("MLP size {}", vcfg.mlp_dim, dim(source, f"{vl}mlp.dense_h_to_4h.weight", 0))],
                origins["vision"]),
            size_hint("Q-Former", [
                SizeCheck("hidden size {}", qcfg.hidden, dim(source, f"{q}word_embeddings.weight", 1)),
                SizeCheck("{} layers", qcfg.layers, count_indexed(source.keys(), re.escape(q) + r"layers\.(\d+)\.")),
                SizeCheck("{} query tokens", qcfg.num_query, dim(source, f"{q}word_embeddings.weight", 0)),
                SizeCheck("intermediate size {}", qcfg.ffn, dim(source, f"{ql}mlp.dense_h_to_4h.weight", 0)),
                SizeCheck("cross-attention width {}", qcfg.encoder_width,
                          dim(source, f"{ql}cross_attention.key_value.weight", 1))], origins["qformer"]),
            size_hint("glm_proj", [
                SizeCheck("input width {}", pcfg.in_dim, dim(source, f"{files.prefix}glm_proj.weight", 1)),
                SizeCheck("output width {}", pcfg.out_dim, dim(source, f"{files.prefix}glm_proj.weight", 0))],
                "the Q-Former's hidden size and the GLM's"),
        ]
    return hints
