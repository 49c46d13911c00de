"""`--checkpoint`: a tiny checkpoint folder in MiniGPT-4's real formats exports to a bundle
whose graphs compute what the original modules compute."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tests.helpers.minigpt4_tiny import EVA, QF, modules, write_checkpoint
from vlm2om.exporters.families.minigpt4 import recipe as minigpt4
from vlm2om.exporters.core.checkpoints import CheckpointError
from vlm2om.exporters.cli.main import main
from vlm2om.exporters.core.driver import write_bundle
from vlm2om.exporters.core.tiny_tokenizer import build_tiny_tokenizer
from vlm2om.runtime.bundle import Bundle
from vlm2om.runtime.backends import open_session


def _close(got, want, dtype, atol):
    """fp32: elementwise; fp16: the relative error the fp16 verification threshold allows."""
    got = np.asarray(got, np.float64)
    if dtype == "float32":
        np.testing.assert_allclose(got, want, atol=atol, rtol=1e-3)
    else:
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel < 1e-2, rel


# float16 is the default for a checkpoint; float32 is asked for explicitly.
@pytest.mark.parametrize("fmt,dtype", [("safetensors", None), ("bin", "float32")])
def test_checkpoint_folder_exports_the_same_numbers(tmp_path, fmt, dtype):
    mods = modules()
    ckpt = write_checkpoint(tmp_path / "ckpt", mods, fmt)
    (ckpt / "vicuna" / "tokenizer.model").write_bytes(build_tiny_tokenizer())
    opts = minigpt4.ExportOptions(preset=None, checkpoint=ckpt, seq_gears=(1, 8), cache_gears=(16, 32),
                                  layers_per_group=2, vision=EVA, qformer=QF, dtype=dtype)
    plan = minigpt4.plan(opts)
    assert plan.provenance["source"]["ignored_keys"], "ignored keys are listed, not silent"
    bundle = Bundle.open(write_bundle(plan, tmp_path / "bundle", echo=lambda s: None).root)
    assert bundle.manifest["pipeline"]["decoder_graphs"] == ["decoder_0", "decoder_1"]
    dtype = dtype or "float16"
    assert bundle.manifest["dtype"] == bundle.manifest["kv_cache"]["dtype"] == dtype
    npdt = np.dtype(dtype)

    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, EVA.image_size, EVA.image_size, generator=g)
    with torch.no_grad():
        want = mods["proj"](mods["qformer"](mods["vision"](image)))
    x = image.numpy()
    # A checkpoint's EVA is exported as two chained graphs (vision_0, vision_1) by default.
    assert bundle.manifest["pipeline"]["image_graphs"] == ["vision_0", "vision_1", "bridge"]
    for name in bundle.manifest["pipeline"]["image_graphs"]:
        s = open_session("ort", bundle, name)
        x = s.run({s.inputs[0].name: x.astype(npdt)})[s.outputs[0].name]
    assert x.dtype == npdt
    _close(x, want.numpy(), dtype, atol=2e-3)  # fp16-stored weights, fp32 math

    ids = torch.tensor([[1, 5, 9, 3, 7, 2, 4, 8]])
    with torch.no_grad():
        emb = mods["embed"].half().float()(ids)
        lm = mods["lm"].half().float()
        logits, _ = lm(emb, torch.arange(8)[None], torch.zeros(1, 0), torch.zeros(4, 2, 1, 2, 0, 8))
    hidden = open_session("ort", bundle, "embed").run({"input_ids": ids.numpy()})["inputs_embeds"]
    np.testing.assert_allclose(hidden, emb.numpy(), atol=1e-6)  # the stored weights are fp16 values
    feeds = {"position_ids": np.arange(8)[None], "attention_mask": np.zeros((1, 16), np.float32)}
    for name, last in (("decoder_0", {}), ("decoder_1", {"logits_index": np.array([5])})):
        out = open_session("ort", bundle, name).run(
            {"hidden_states": hidden, "past_kv": np.zeros((2, 2, 1, 2, 16, 8), npdt), **feeds, **last})
        hidden = out.get("hidden_states_out")
    _close(out["logits"], logits[:, 5].numpy(), dtype, atol=1e-4)

    # verify --reference rebuilds the modules from the provenance, EVA's and the Q-Former's
    # head counts (which no weight shape tells) included.
    assert bundle.manifest["provenance"]["options"]["vision"]["heads"] == EVA.heads
    r = CliRunner().invoke(main, ["verify", str(bundle.root), "--reference", "--no-e2e", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "PASS: 13 subgraph outputs" in r.output


def test_bad_checkpoint_leaves_no_bundle(tmp_path):
    mods = modules()
    ckpt = write_checkpoint(tmp_path / "ckpt", mods)
    (ckpt / "eva_vit_g.pth").write_bytes((ckpt / "blip2_pretrained_flant5xxl.pth").read_bytes())
    opts = minigpt4.ExportOptions(preset=None, checkpoint=ckpt, vision=EVA, qformer=QF)
    with pytest.raises(CheckpointError, match="eva_vit_g.pth"):
        write_bundle(minigpt4.plan(opts), tmp_path / "bundle", echo=lambda s: None)
    assert not (tmp_path / "bundle").exists()
