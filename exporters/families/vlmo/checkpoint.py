"""VLMo's released checkpoints and their map onto graphs/vlmo.py.

Why: the checkpoints (``vlmo_base_patch16_480_vqa.pt``, the COCO/Flickr retrieval ones) are PyTorch
Lightning saves with the weights under ``['state_dict']`` (some copies under ``['module']`` or
``['model']``, or bare), no config file beside them, and the original loads them with
``strict=False``, so a wrong file loads silently. Here the sizes are read from the weights' shapes
(only the image size is not in them: the table's rows depend on both the image grid and the text
part), every key is mapped, ignored with its reason, or an error, and the checkpoint says which
graphs it can make: ``vqa`` needs ``vqa_classifier``, retrieval (``text`` and ``image``) needs
both ITC heads. Keys (model-architectures.md section 5.3)::

    transformer.cls_token, transformer.patch_embed.proj.{weight,bias}, transformer.norm.*
    transformer.blocks.N.{norm1, attn.{qkv.weight, q_bias, v_bias, proj}, gamma_1, gamma_2,
                          norm2_text, mlp_text.fc{1,2}, norm2_imag, mlp_imag.fc{1,2}}
    transformer.blocks.N.{norm2_vl, mlp_vl.fc{1,2}}        from vlffn_start_layer_index on
    relative_position_bias_table [distances, heads x layers]
    text_embeddings.{word_embeddings, position_embeddings, token_type_embeddings, LayerNorm}
    token_type_embeddings.weight, pooler.dense.*
    vqa_classifier.{0,1,3}.*                               the VQA checkpoint
    itc_text_proj.fc.weight, itc_image_proj.fc.weight, logit_scale   the retrieval ones
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from vlm2om.graphs.vlmo import VlmoConfig, VlmoEncoder

from vlm2om.exporters.core.checkpoints import (CheckpointError, Ignore, MappingTable, Plan, TensorSource,
                                               expected_shapes, on_meta)
from vlm2om.exporters.core.sources import DictSource, load_pickle

WRAPPERS = ("state_dict", "module", "model")  # where the weights sit, in the order looked for
GRAPHS = {"vqa": ("vl",), "retrieval": ("text", "image")}
IGNORE = (
    Ignore(r"(text_imag_|text_)?relative_position_index", "index buffers of older saves; recomputed"),
    Ignore(r"text_embeddings\.(position_ids|token_type_ids)", "BERT's index buffers"),
    Ignore(r"itc_vl_(text|image)_proj\..*|itm_score\..*|mlm_score\..*",
           "pretraining heads: neither VQA nor retrieval uses them"),
    Ignore(r"logit_scale", "retrieval's temperature: recorded in the manifest, not a graph weight"),
    Ignore(r"pooler\.dense\.(weight|bias)", "the pooler feeds the VQA and ITM heads, not retrieval's ITC heads"),
)


def open_vlmo(path: str | Path) -> TensorSource:
    """The state dict of a VLMo checkpoint file: under the first of ``WRAPPERS`` it has, else bare."""
    path = Path(path)
    obj = load_pickle(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a checkpoint dict, found {type(obj).__name__}")
    sub = next((k for k in WRAPPERS if isinstance(obj.get(k), Mapping)), None)
    return DictSource(path, sub, loaded=obj)


def _dim(source: TensorSource, key: str, axis: int) -> int:
    if key not in source.keys():
        raise CheckpointError(f"{source.name}: no '{key}'; is this a VLMo checkpoint?")
    return int(source.shape(key)[axis])


def vlmo_config(source: TensorSource, image_size: int = 480) -> VlmoConfig:
    """Every size from the shapes; ``image_size`` (the checkpoint's fine-tuning resolution: 480 for
    VQA, 384 for COCO retrieval) with the table's rows gives the text part's length."""
    width = _dim(source, "transformer.cls_token", 2)
    patch = _dim(source, "transformer.patch_embed.proj.weight", 3)
    keys = source.keys()
    blocks = sorted({int(m.group(1)) for k in keys if (m := re.match(r"transformer\.blocks\.(\d+)\.", k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise CheckpointError(f"{source.name}: transformer.blocks are {blocks[:5]}..., not 0..N-1")
    layers = len(blocks)
    vl = [i for i in blocks if f"transformer.blocks.{i}.mlp_vl.fc1.weight" in keys]
    rows, cols = _dim(source, "relative_position_bias_table", 0), _dim(source, "relative_position_bias_table", 1)
    if cols % layers or width % (cols // layers or 1):
        raise CheckpointError(f"{source.name}: relative_position_bias_table has {cols} columns, not heads x "
                              f"{layers} layers of a width {width} that the heads divide")
    if image_size % patch:
        raise CheckpointError(f"image size {image_size} is not a multiple of the patch size {patch}")
    grid = image_size // patch
    text_part = rows - (2 * grid - 1) ** 2 - 3 - 2
    text_len = _dim(source, "text_embeddings.position_embeddings.weight", 0)
    if text_part <= 0 or text_part % 2 or text_part // 2 < text_len - 1:
        raise CheckpointError(f"{source.name}: relative_position_bias_table has {rows} rows, which no text part "
                              f"fits beside a {grid}x{grid} image grid: is the image size {image_size} the "
                              "checkpoint's? (VQA 480, COCO retrieval 384)")
    labels = _dim(source, "vqa_classifier.3.weight", 0) if "vqa_classifier.3.weight" in keys else 3129
    return VlmoConfig(image_size=image_size, patch_size=patch, width=width, layers=layers, heads=cols // layers,
                      mlp_ratio=_dim(source, "transformer.blocks.0.mlp_text.fc1.weight", 0) // width,
                      vlffn_start=min(vl) if vl else layers, max_text_len=text_len, text_rel_len=text_part // 2,
                      vocab_size=_dim(source, "text_embeddings.word_embeddings.weight", 0), vqa_labels=labels)


def tasks(source: TensorSource) -> list[str]:
    """What the checkpoint can make: ``vqa`` and/or ``retrieval``, else an error saying why not."""
    keys = set(source.keys())
    found = [t for t, need in (("vqa", "vqa_classifier.3.weight"),
                               ("retrieval", "itc_text_proj.fc.weight")) if need in keys]
    if "retrieval" in found and "itc_image_proj.fc.weight" not in keys:
        raise CheckpointError(f"{source.name}: has itc_text_proj but no itc_image_proj")
    if not found:
        raise CheckpointError(f"{source.name}: has neither the VQA head (vqa_classifier) nor the retrieval heads "
                              "(itc_text_proj, itc_image_proj): a pretraining checkpoint? Export a fine-tuned one")
    return found


def graph_plan(source: TensorSource, cfg: VlmoConfig, modality: str) -> Plan:
    """One graph's names and shapes, mapped by the identity (graphs/vlmo.py keeps the checkpoint's names)."""
    want = expected_shapes(on_meta(lambda: VlmoEncoder(cfg, modality)))
    return MappingTable(tuple((k, k) for k in want), IGNORE).plan(source, want, check_unmapped=False)


def check_vlmo(source: TensorSource, cfg: VlmoConfig) -> tuple[list[str], list[Plan], list[tuple[str, str]]]:
    """(tasks, their graphs' plans, the (key, why) ignored); every checkpoint key must be read by one
    of the graphs or ignored by a rule, and every graph's key must be there with its shape."""
    found = tasks(source)
    plans = [graph_plan(source, cfg, m) for t in found for m in GRAPHS[t]]
    used = {k for p in plans for k in p.pairs.values()}
    ignored, problems = [], [p for plan in plans for p in plan.problems]
    for k in source.keys():
        if k in used:
            continue
        why = next((i.why for i in IGNORE if i.matches(k)), None)
        if why is None:
            problems.append(f"{source.name}: '{k}' is not mapped: no table entry or ignore rule names it")
        else:
            ignored.append((k, why))
    if problems:
        shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"the VLMo checkpoint does not fit ({len(problems)} problems):\n  {shown}")
    return found, plans, ignored
