"""MiniGPT-4 checkpoint loading on a tiny directory written in the real formats and key names
(the Vicuna folder alone: tests/exporters/llm/test_llama_weights.py)."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from tests.helpers.minigpt4_tiny import EVA, LLM, PROJ, QF, eva_file, modules, state_dict, write_checkpoint
from vlm2om.exporters.core.checkpoints import CheckpointError, load_pickle
from vlm2om.exporters.families.minigpt4.checkpoint import (check_llm_keys, find_files, projector_state,
                                                           qformer_state, vision_state)
from vlm2om.exporters.llm import llama_weights as lw
from vlm2om.graphs.eva_vit import EvaVisionEncoder
from vlm2om.graphs.llama import LlamaDecoderGroup
from vlm2om.graphs.qformer import QFormer
from vlm2om.runtime.errors import Vlm2omError


@pytest.fixture(scope="module")
def mods():
    return modules()


def _assert_equal(state, module, dtype=None):
    ref = state_dict(module)
    assert set(state) == set(ref)
    for k, v in ref.items():
        torch.testing.assert_close(state[k], v.to(dtype or v.dtype), rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_roundtrip_every_module(tmp_path, mods, fmt):
    files = find_files(write_checkpoint(tmp_path / "ckpt", mods, fmt))
    assert lw.read_llama_config(files.llm_dir) == LLM
    vis = vision_state(files, EVA)
    _assert_equal(vis.state, mods["vision"])
    ignored = {k for _, k, _ in vis.ignored}
    assert {"blocks.2.norm1.weight", "norm.weight"} <= ignored
    qf = qformer_state(files, QF)
    _assert_equal(qf.state, mods["qformer"])
    assert "t5_proj.weight" in {k for _, k, _ in qf.ignored}
    _assert_equal(projector_state(files, PROJ).state, mods["proj"])
    # The LLM folder is fp16 like the real one; compare in fp16.
    _assert_equal(lw.embed_state(files.llm_dir, LLM, torch.float16).state, mods["embed"], torch.float16)
    full = state_dict(mods["lm"])
    for start, stop in [(0, 2), (2, 4)]:
        got = lw.decoder_group_state(files.llm_dir, LLM, start, stop, torch.float16).state
        group = LlamaDecoderGroup(LLM, start, stop)
        group.load_state_dict(got, strict=True)
        for k, v in group.state_dict().items():
            if k.startswith("layers."):
                _, j, rest = k.split(".", 2)
                k = f"layers.{int(j) + start}.{rest}"
            torch.testing.assert_close(v, full[k].half().float(), rtol=0, atol=0, msg=k)
    report = check_llm_keys(files, LLM)
    assert report.state == {}
    assert len(report.ignored) == (LLM.layers if fmt == "bin" else 0)
    # States load strictly into fresh modules.
    EvaVisionEncoder(EVA).load_state_dict(vis.state, strict=True)
    QFormer(QF).load_state_dict(qf.state, strict=True)


def test_misspelled_minigpt4_file_is_found(tmp_path, mods):
    files = find_files(write_checkpoint(tmp_path / "c", mods, minigpt4_name="prerained_minigpt4_7b.pth"))
    assert files.minigpt4.name == "prerained_minigpt4_7b.pth"
    _assert_equal(projector_state(files, PROJ).state, mods["proj"])


def test_find_files_names_every_missing_file(tmp_path):
    (tmp_path / "vicuna").mkdir()
    with pytest.raises(CheckpointError) as err:
        find_files(tmp_path)
    msg = str(err.value)
    for name in ("eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth", "pretrained_minigpt4_7b.pth",
                 "config.json", "tokenizer.model", "model.safetensors.index.json"):
        assert name in msg
    assert isinstance(err.value, Vlm2omError)


def test_all_problems_in_one_error_with_both_shapes(tmp_path, mods):
    root = write_checkpoint(tmp_path / "ckpt", mods)
    eva = eva_file(mods)
    eva["pos_embed"] = torch.zeros(1, 17, 16)  # e.g. a 448-px grid in a 224-px config
    del eva["blocks.1.mlp.fc2.bias"]
    torch.save(eva, root / "eva_vit_g.pth")
    with pytest.raises(CheckpointError) as err:
        vision_state(find_files(root), EVA)
    msg = str(err.value)
    assert "'pos_embed'" in msg and "[1, 17, 16]" in msg and "[1, 5, 16]" in msg
    assert "blocks.1.mlp.fc2.bias" in msg and "missing" in msg


def test_unmapped_key_is_an_error(tmp_path, mods):
    root = write_checkpoint(tmp_path / "ckpt", mods)
    eva = eva_file(mods)
    eva["blocks.0.gamma_1"] = torch.ones(16)  # layer-scale would change the math
    torch.save(eva, root / "eva_vit_g.pth")
    with pytest.raises(CheckpointError, match=r"unmapped key .*'blocks\.0\.gamma_1' \[16\]"):
        vision_state(find_files(root), EVA)


def test_blip2_file_in_place_of_eva(tmp_path, mods):
    root = write_checkpoint(tmp_path / "ckpt", mods)
    (root / "eva_vit_g.pth").write_bytes((root / "blip2_pretrained_flant5xxl.pth").read_bytes())
    with pytest.raises(CheckpointError, match=r"eva_vit_g\.pth.*'model'.*right file"):
        vision_state(find_files(root), EVA)


def test_eva_file_in_place_of_blip2(tmp_path, mods):
    root = write_checkpoint(tmp_path / "ckpt", mods)
    (root / "blip2_pretrained_flant5xxl.pth").write_bytes((root / "eva_vit_g.pth").read_bytes())
    with pytest.raises(CheckpointError, match=r"blip2_pretrained_flant5xxl\.pth: no 'model' entry"):
        qformer_state(find_files(root), QF)


class _Runs:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Custom:
    def __init__(self):
        self.weight = torch.zeros(2)


def test_pickles_that_need_code_are_refused(tmp_path, mods):
    marker = tmp_path / "ran"
    raw = tmp_path / "raw.pth"
    raw.write_bytes(pickle.dumps({"model": _Runs(marker)}, protocol=2))  # legacy (non-zip) pickle
    zipped = tmp_path / "zipped.pth"
    torch.save({"blocks.0.x": _Runs(marker)}, zipped)
    custom = tmp_path / "custom.pth"
    torch.save(_Custom(), custom)
    for path in (raw, zipped, custom):
        with pytest.raises(CheckpointError, match="never runs code") as err:
            load_pickle(path)
        assert path.name in str(err.value)
    root = write_checkpoint(tmp_path / "ckpt", mods)
    (root / "eva_vit_g.pth").write_bytes(zipped.read_bytes())
    with pytest.raises(CheckpointError, match="never runs code"):
        vision_state(find_files(root), EVA)
    assert not marker.exists()


def test_truncated_and_legacy_pickles(tmp_path):
    sd = {"a": torch.arange(6.0)}
    legacy = tmp_path / "legacy.pth"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(load_pickle(legacy)["a"], sd["a"])
    cut = tmp_path / "cut.pth"
    torch.save(sd, cut)
    cut.write_bytes(cut.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"cut\.pth.*truncated or corrupt"):
        load_pickle(cut)
