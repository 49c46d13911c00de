"""Tiny VLMo checkpoints in the released layout: a PyTorch Lightning save (``['state_dict']`` with
``epoch``, ``global_step`` and the like beside it), ``['module']``/``['model']``, or bare.

The keys are written from a list of the ORIGINAL names and shapes (model-architectures.md 5.3:
``VLMo``'s state dict, the index buffers older saves carry included), never from our modules, so a
naming mistake in vlm2om's table fails the tests. Sizes: width 16, 3 layers (the VL expert from
layer 2), 2 heads, MLP x2, 48 px images of 16 px patches (3 x 3), text of 6 tokens, a text table
part of 2 x 8, vocabulary 50, 7 answers.
"""
from __future__ import annotations

from pathlib import Path

import torch

W, LAYERS, HEADS, VL_START, MLP, PATCH, IMAGE, TEXT, TEXT_REL, VOCAB, LABELS = 16, 3, 2, 2, 2, 16, 48, 6, 8, 50, 7
GRID = IMAGE // PATCH
TABLE_ROWS = (2 * GRID - 1) ** 2 + 3 + 2 * TEXT_REL + 2


def original_shapes(task: str = "vqa", buffers: bool = True, pretraining: bool = False) -> dict[str, tuple]:
    """Every key of the original VLMo state dict for a fine-tuned ``task`` ("vqa" | "retrieval")."""
    ln = lambda p: {f"{p}.weight": (W,), f"{p}.bias": (W,)}  # noqa: E731
    mlp = lambda p: {f"{p}.fc1.weight": (MLP * W, W), f"{p}.fc1.bias": (MLP * W,),  # noqa: E731
                     f"{p}.fc2.weight": (W, MLP * W), f"{p}.fc2.bias": (W,)}
    out = {"transformer.cls_token": (1, 1, W), "transformer.patch_embed.proj.weight": (W, 3, PATCH, PATCH),
           "transformer.patch_embed.proj.bias": (W,)}
    for i in range(LAYERS):
        p = f"transformer.blocks.{i}."
        out.update({p + "gamma_1": (W,), p + "gamma_2": (W,), **ln(p + "norm1"), p + "attn.qkv.weight": (3 * W, W),
                    p + "attn.q_bias": (W,), p + "attn.v_bias": (W,), p + "attn.proj.weight": (W, W),
                    p + "attn.proj.bias": (W,), **ln(p + "norm2_text"), **mlp(p + "mlp_text"),
                    **ln(p + "norm2_imag"), **mlp(p + "mlp_imag")})
        if i >= VL_START:
            out.update({**ln(p + "norm2_vl"), **mlp(p + "mlp_vl")})
    out.update({**ln("transformer.norm"), "relative_position_bias_table": (TABLE_ROWS, HEADS * LAYERS),
                "text_embeddings.word_embeddings.weight": (VOCAB, W),
                "text_embeddings.position_embeddings.weight": (TEXT, W),
                "text_embeddings.token_type_embeddings.weight": (2, W), **ln("text_embeddings.LayerNorm"),
                "token_type_embeddings.weight": (2, W), "pooler.dense.weight": (W, W), "pooler.dense.bias": (W,)})
    if buffers:
        out.update({"text_embeddings.position_ids": (1, TEXT), "relative_position_index": (GRID * GRID + 1,) * 2,
                    "text_imag_relative_position_index": (TEXT + GRID * GRID + 1,) * 2})
    if task == "vqa":
        out.update({"vqa_classifier.0.weight": (2 * W, W), "vqa_classifier.0.bias": (2 * W,),
                    "vqa_classifier.1.weight": (2 * W,), "vqa_classifier.1.bias": (2 * W,),
                    "vqa_classifier.3.weight": (LABELS, 2 * W), "vqa_classifier.3.bias": (LABELS,)})
    elif task == "retrieval":
        out.update({"itc_text_proj.fc.weight": (W, W), "itc_image_proj.fc.weight": (W, W), "logit_scale": ()})
    if pretraining:
        out.update({"itc_vl_text_proj.fc.weight": (W, W), "itm_score.fc.weight": (2, W), "mlm_score.bias": (VOCAB,)})
    return out


def write_vlmo_checkpoint(path: Path, task: str = "vqa", wrapper: str | None = "state_dict", seed: int = 0,
                          edit=None, **shapes) -> dict[str, torch.Tensor]:
    """Write the file (``wrapper`` None: a bare state dict); return the state dict written."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in original_shapes(task, **shapes).items():
        if k.endswith(("position_ids", "position_index")):
            state[k] = torch.zeros(shape, dtype=torch.int64)
        elif k.endswith("norm.weight") or "LayerNorm.weight" in k or "norm1.weight" in k or "norm2_" in k and k.endswith("weight"):
            state[k] = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            state[k] = 0.3 * torch.randn(shape, generator=gen)
    state = edit(state) if edit else state
    obj = state if wrapper is None else {wrapper: state, "epoch": 9, "global_step": 1234,
                                         "pytorch-lightning_version": "1.5.5", "loops": {"fit": {"epoch": 9}}}
    torch.save(obj, path)
    return state
