"""VLMo's checkpoint reader (exporters/families/vlmo/checkpoint.py) on tiny files in the released
layouts, written from the original key names: sizes from the shapes, what each file can make,
every key mapped or ignored with its reason, the loud failures."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.vlmo_checkpoints import IMAGE, LABELS, LAYERS, TEXT, TEXT_REL, VL_START, write_vlmo_checkpoint
from vlm2om.exporters.core.checkpoints import CheckpointError, load_plans
from vlm2om.exporters.families.vlmo.checkpoint import check_vlmo, open_vlmo, tasks, vlmo_config


@pytest.mark.parametrize("wrapper", ["state_dict", "module", "model", None])
def test_sizes_come_from_the_shapes_in_every_wrapper(tmp_path, wrapper):
    path = tmp_path / "vlmo_vqa.pt"
    written = write_vlmo_checkpoint(path, "vqa", wrapper)
    source = open_vlmo(path)
    cfg = vlmo_config(source, image_size=IMAGE)
    assert (cfg.width, cfg.layers, cfg.heads, cfg.vlffn_start, cfg.mlp_ratio) == (16, LAYERS, 2, VL_START, 2)
    assert (cfg.max_text_len, cfg.text_rel_len, cfg.vocab_size, cfg.vqa_labels) == (TEXT, TEXT_REL, 50, LABELS)
    found, plans, ignored = check_vlmo(source, cfg)
    assert found == ["vqa"] and len(plans) == 1
    state = load_plans(plans).state
    for k, v in state.items():  # the identity map: our names are the checkpoint's
        assert torch.equal(v, written[k]), k
    assert {k for k, _ in ignored} == {"relative_position_index", "text_imag_relative_position_index",
                                       "text_embeddings.position_ids"}


def test_a_retrieval_checkpoint_makes_the_text_and_image_encoders(tmp_path):
    path = tmp_path / "vlmo_coco.ckpt"
    write_vlmo_checkpoint(path, "retrieval", pretraining=True)
    source = open_vlmo(path)
    found, plans, ignored = check_vlmo(source, vlmo_config(source, IMAGE))
    assert found == ["retrieval"] and len(plans) == 2
    assert {"pooler.dense.weight", "logit_scale", "itc_vl_text_proj.fc.weight", "itm_score.fc.weight"} <= {
        k for k, _ in ignored}
    names = [set(p.pairs) for p in plans]
    assert "itc_text_proj.fc.weight" in names[0] and "itc_image_proj.fc.weight" in names[1]
    assert "transformer.patch_embed.proj.weight" not in names[0]  # the text encoder has no image tower


def test_loud_failures(tmp_path):
    path = tmp_path / "x.pt"
    write_vlmo_checkpoint(path, "vqa", edit=lambda s: {**s, "mystery.weight": torch.zeros(2)})
    source = open_vlmo(path)
    with pytest.raises(CheckpointError, match="'mystery.weight' is not mapped"):
        check_vlmo(source, vlmo_config(source, IMAGE))
    write_vlmo_checkpoint(path, "vqa", edit=lambda s: {k: v for k, v in s.items() if k != "transformer.blocks.1.gamma_2"})
    source = open_vlmo(path)
    with pytest.raises(CheckpointError, match="transformer.blocks.1.gamma_2"):
        check_vlmo(source, vlmo_config(source, IMAGE))
    with pytest.raises(CheckpointError, match="is the image size 64 the checkpoint's"):
        vlmo_config(source, image_size=64)
    write_vlmo_checkpoint(path, task="pretrain")
    with pytest.raises(CheckpointError, match="neither the VQA head"):
        tasks(open_vlmo(path))
