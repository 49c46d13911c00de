"""Checkpoint folders as users really have them: missing or truncated files, a pickle that wants to
run code, renamed keys, NaN weights, the wrong model size, a missing shard. Written in the real
formats (llava-hf's safetensors, MiniGPT-4's .pth files) at toy size, exported through the CLI
onto a previous bundle: each ends in one error naming the file and the key or size at fault, the
bundle byte-identical, nothing left beside it, and no code from a pickle ever run."""
from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers.bundles import copy_bundle
from tests.helpers.faults import expect_error, invoke, leftovers, snapshot
from tests.helpers.llava_tiny import hf_llava, write_llava_hf
from tests.helpers.minigpt4_tiny import EVA, QF, modules, write_checkpoint

PROJ = "model.multi_modal_projector.linear_2.weight"  # [64, 64] in the tiny llava-hf file


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One tiny checkpoint per layout, written once; cases damage copies."""
    root, model = tmp_path_factory.mktemp("checkpoints"), hf_llava(seed=1)
    return {"llava": write_llava_hf(root / "llava-hf", model, "new"),
            "llava-sharded": write_llava_hf(root / "llava-hf-sharded", model, "old"),
            "minigpt4": write_checkpoint(root / "minigpt4", modules(), "safetensors")}


@pytest.fixture
def ck(sources, tmp_path):
    return lambda name: shutil.copytree(sources[name], tmp_path / "ck")


@pytest.fixture
def previous(tmp_path):
    """A previous bundle at --out (a session bundle's copy), byte-identical after the case, and no
    staging or lock folder beside it."""
    made = []

    def make(bundle):
        out = copy_bundle(bundle, tmp_path, "out")
        made.append((out, snapshot(out)))
        return out

    yield make
    for out, before in made:
        assert snapshot(out) == before
    assert leftovers(tmp_path) == []


@pytest.fixture
def llava_out(previous, llava_bundle):
    return previous(llava_bundle)


@pytest.fixture
def minigpt4_out(previous, tiny_bundle):
    return previous(tiny_bundle)


def export(family, ck, out, *extra):
    return invoke("export", family, "--checkpoint", ck, "--out", out, *extra)


def edit(ck, change) -> None:
    """Rewrite the llava-hf file with ``change(tensors)`` applied."""
    path = ck / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def poison(values):
    def change(t):
        t[PROJ] = t[PROJ].clone()
        t[PROJ].view(-1)[:len(values)] = torch.tensor(values, dtype=t[PROJ].dtype)
    return change


# --- tensors that cannot be exported ---------------------------------------------------------------

@pytest.mark.parametrize("values,counts", [
    ([float("nan")] * 3, "3 NaN values"),
    ([float("inf"), -float("inf")], "2 inf values"),
    ([float("nan"), float("inf")], "1 NaN value and 1 inf value"),
], ids=["nan", "inf", "nan-and-inf"])
def test_non_finite_weight_named_at_load(ck, llava_out, values, counts):
    folder = ck("llava")
    edit(folder, poison(values))
    r = export("llava15", folder, llava_out)
    expect_error(r, f"checkpoint '{folder / 'model.safetensors'}': tensor '{PROJ}' has {counts} (of 4096)", code=1)
    assert "max_abs=nan" not in r.output and len(r.error_lines) == 1


def test_weight_beyond_float16_is_named(ck, llava_out):
    folder = ck("llava")
    edit(folder, lambda t: t.__setitem__(PROJ, torch.full((64, 64), 1e6)))  # fp32 in the file
    expect_error(export("llava15", folder, llava_out),
                 f"tensor '{PROJ}' has values up to 1e+06, beyond float16's range; export with --dtype float32", code=1)


def test_non_finite_pth_weight_named_with_its_file(tmp_path, tiny_bundle, previous):
    """MiniGPT-4's .pth files through the Python API (its EVA and Q-Former sizes are Python-only)."""
    from vlm2om.exporters.core.checkpoints import CheckpointError
    from vlm2om.exporters.core.driver import write_bundle
    from vlm2om.exporters.families.minigpt4 import recipe

    mods = modules()
    with torch.no_grad():
        mods["proj"].proj.weight[0, :3] = float("nan")
    folder = write_checkpoint(tmp_path / "ck", mods)
    out = previous(tiny_bundle)
    plan = recipe.plan(recipe.ExportOptions(preset=None, checkpoint=folder, vision=EVA, qformer=QF))
    with pytest.raises(CheckpointError) as err:
        write_bundle(plan, out, echo=lambda s: None)
    assert str(err.value).startswith(f"checkpoint '{folder / 'pretrained_minigpt4_7b.pth'}': tensor "
                                     "'llama_proj.weight' has 3 NaN values (of 512)")


# --- names and sizes that do not fit ---------------------------------------------------------------

def test_renamed_key_names_both_sides(ck, llava_out):
    folder = ck("llava")
    old, new = "model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.fc1.weight"
    edit(folder, lambda t: t.__setitem__(new, t.pop(old)))
    out = expect_error(export("llava15", folder, llava_out), f"unmapped key in {folder / 'model.safetensors'}: '{new}'",
                       f"missing in {folder / 'model.safetensors'}: '{old}'", "2 problem(s)", code=1)
    assert out.count("\n  - ") == 2


def test_size_mismatch_leads_with_the_sizes(ck, llava_out):
    folder = ck("llava")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"].update(hidden_size=32, num_hidden_layers=4)
    (folder / "config.json").write_text(json.dumps(cfg))
    r = export("llava15", folder, llava_out)
    out = expect_error(r, "the checkpoint's LLM has hidden size 64, 2 layers and key/value width 32; the options say "
                          f"32, 4 and 16 (read from {folder / 'config.json'})", "problem(s), the first 8:", code=1)
    assert out.count("\n  - ") == 8 and "  ... and " in out and len(out.splitlines()) < 15


def test_minigpt4_size_mismatch_is_a_short_list(ck, minigpt4_out):
    """The CLI sizes MiniGPT-4's image side as the real model: a toy checkpoint gave 769 lines."""
    folder = ck("minigpt4")
    out = expect_error(export("minigpt4", folder, minigpt4_out),
                       "the checkpoint's EVA ViT has width 16, 2 blocks, 5 position embeddings and MLP size 24; the "
                       "options say 1408, 39, 257 and 6144", "the checkpoint's Q-Former has hidden size 16",
                       "769 problem(s), the first 8:", "  ... and 761 more", code=1)
    assert len(out.splitlines()) < 15


# --- files that are missing, damaged or unsafe -----------------------------------------------------

def test_truncated_safetensors(ck, llava_out):
    folder = ck("llava")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    expect_error(export("llava15", folder, llava_out),
                 f"{path}: cannot read safetensors file, it is truncated or corrupt", code=1)


def test_missing_index_shard(ck, llava_out):
    folder = ck("llava-sharded")
    (folder / "model-00002-of-00003.safetensors").unlink()
    expect_error(export("llava15", folder, llava_out),
                 f"{folder / 'model.safetensors.index.json'}: shard(s) named in the index are missing: "
                 "model-00002-of-00003.safetensors", code=1)


def test_unreadable_config(ck, llava_out):
    folder = ck("llava")
    (folder / "config.json").write_bytes(b'{"text_config": \xff')
    r = export("llava15", folder, llava_out)
    expect_error(r, f"{folder / 'config.json'}: cannot read config", code=1)
    assert "building" not in r.output  # refused before the family, and torch, was imported


@pytest.mark.parametrize("family,needles", [
    ("llava15", ["no config.json; expected a LLaVA-1.5 model folder (original or llava-hf)"]),
    ("minigpt4", ["incomplete MiniGPT-4 checkpoint directory; missing:", "eva_vit_g.pth",
                  "blip2_pretrained_flant5xxl.pth", "pretrained_minigpt4_7b.pth", "vicuna/ (Hugging Face"]),
])
def test_folder_without_the_expected_files(tmp_path, previous, llava_bundle, tiny_bundle, family, needles):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "README.md").write_text("weights go here")
    out = previous(llava_bundle if family == "llava15" else tiny_bundle)
    expect_error(export(family, tmp_path / "ck", out), *needles, code=1)


@pytest.mark.parametrize("name", ["tokenizer.model", "config.json"])
def test_one_missing_file_is_named(ck, llava_out, name):
    folder = ck("llava")
    (folder / name).unlink()
    expect_error(export("llava15", folder, llava_out), str(folder if name == "config.json" else folder / name),
                 "no config.json" if name == "config.json" else "incomplete LLaVA-1.5 checkpoint directory", code=1)


@pytest.mark.parametrize("damage,needle", [
    ("truncated", "cannot read checkpoint, the file is truncated or corrupt ("),
    ("random", "cannot read checkpoint, the file is truncated or corrupt ("),
    ("empty", "cannot read checkpoint, the file is truncated or corrupt (EOFError)"),
])
def test_damaged_pth(ck, minigpt4_out, damage, needle):
    folder = ck("minigpt4")
    path = folder / "eva_vit_g.pth"
    data = {"truncated": path.read_bytes()[:path.stat().st_size // 2], "random": random.Random(0).randbytes(4096), "empty": b""}
    path.write_bytes(data[damage])
    expect_error(export("minigpt4", folder, minigpt4_out), f"{path}: {needle}", code=1)


class _RunsCode:
    """Unpickling this would make a folder: the proof that no pickle code ran is that none exists."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pickle_that_runs_code_is_refused_unrun(ck, minigpt4_out, tmp_path):
    folder = ck("minigpt4")
    marker = tmp_path / "code-ran"
    path = folder / "pretrained_minigpt4_7b.pth"
    torch.save({"model": {"llama_proj.weight": _RunsCode(marker), "llama_proj.bias": torch.zeros(32)}}, path)
    expect_error(export("minigpt4", folder, minigpt4_out),
                 f"{path}: refused to load: the pickle needs code to run", "GLOBAL posix.mkdir",
                 "vlm2om never runs code from a checkpoint", code=1)
    assert not marker.exists()


def test_training_checkpoint_instead_of_weights(ck, minigpt4_out):
    folder = ck("minigpt4")
    path = folder / "pretrained_minigpt4_7b.pth"
    torch.save({"model": {"state_dict": {"llama_proj.weight": torch.zeros(32, 16)}, "epoch": 3}}, path)
    expect_error(export("minigpt4", folder, minigpt4_out), f"{path}['model']: expected a state dict of tensors, but "
                 "entry 'state_dict' is a dict (it looks like a training checkpoint", code=1)
