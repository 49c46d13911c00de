"""MiniGPT-4 checkpoint loading on a tiny directory written in the real formats and key names."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vlm2om.exporters.core import checkpoints
from vlm2om.exporters.core.checkpoints import CheckpointError, load_pickle
from vlm2om.exporters.families.minigpt4.checkpoint import (check_llm_keys, decoder_group_state, embed_state,
                                        find_files, projector_state, qformer_state,
                                        read_llama_config, vision_state)
from vlm2om.graphs.common import init_random_
from vlm2om.graphs.eva_vit import EvaVisionEncoder, EvaVitConfig
from vlm2om.graphs.llama import LlamaConfig, LlamaDecoderGroup, LlamaEmbedding
from vlm2om.graphs.projector import LinearProjector, LinearProjectorConfig
from vlm2om.graphs.qformer import QFormer, QFormerConfig
from vlm2om.runtime.errors import Vlm2omError

EVA = EvaVitConfig(image_size=28, patch_size=14, width=16, depth=2, heads=2, mlp_dim=24)
QF = QFormerConfig(hidden=16, layers=3, heads=2, ffn=24, encoder_width=16, num_query=4)
PROJ = LinearProjectorConfig(in_dim=16, out_dim=32)
LLM = LlamaConfig(vocab_size=64, hidden=32, layers=4, heads=4, kv_heads=2, ffn=48,
                  max_positions=64)
HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64,
             "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 48, "rms_norm_eps": 1e-6,
             "max_position_embeddings": 64, "hidden_act": "silu", "torch_dtype": "float16"}


def _modules():
    return {"vision": init_random_(EvaVisionEncoder(EVA), 1),
            "qformer": init_random_(QFormer(QF), 2),
            "proj": init_random_(LinearProjector(PROJ), 3),
            "embed": init_random_(LlamaEmbedding(LLM), 4),
            "lm": init_random_(LlamaDecoderGroup(LLM, 0, LLM.layers), 5)}


def _sd(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _hf_llm(mods, with_buffers: bool) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": _sd(mods["embed"])["embed_tokens.weight"]}
    for k, v in _sd(mods["lm"]).items():
        out["lm_head.weight" if k == "lm_head.weight" else f"model.{k}"] = v
    if with_buffers:  # old Vicuna .bin files carry the RoPE buffer per layer
        for i in range(LLM.layers):
            out[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    return out


def _write_llm(folder: Path, tensors: dict[str, torch.Tensor], fmt: str) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(HF_CONFIG))
    (folder / "tokenizer.model").write_bytes(b"placeholder")
    shards: list[dict[str, torch.Tensor]] = [{}, {}, {}]
    for k, v in tensors.items():  # layers 0-1 | layers 2-3 | the rest, like HF's size split
        idx = 2 if not k.startswith("model.layers.") else int(k.split(".")[2]) // 2
        shards[idx][k] = v.to(torch.float16)
    n, weight_map = len(shards), {}
    for i, shard in enumerate(shards, 1):
        if fmt == "safetensors":
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
        else:
            name = f"pytorch_model-{i:05d}-of-{n:05d}.bin"
            torch.save(shard, folder / name)
        weight_map.update({k: name for k in shard})
    index = ("model.safetensors.index.json" if fmt == "safetensors"
             else "pytorch_model.bin.index.json")
    (folder / index).write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def _blip2_model(mods) -> dict[str, torch.Tensor]:
    vis, qf = _sd(mods["vision"]), _sd(mods["qformer"])
    model = {"ln_vision.weight": vis["ln_vision.weight"], "ln_vision.bias": vis["ln_vision.bias"]}
    for k, v in qf.items():
        if k == "query_tokens":
            model[k] = v
        elif k.startswith("embeddings_LayerNorm."):
            model["Qformer.bert.embeddings.LayerNorm." + k.split(".")[-1]] = v
        else:
            model["Qformer.bert.encoder." + k] = v
    # Keys the real file has that MiniGPT-4 does not use.
    model.update({"t5_proj.weight": torch.randn(8, 16), "t5_proj.bias": torch.randn(8),
                  "Qformer.bert.encoder.layer.0.intermediate.dense.weight": torch.randn(24, 16),
                  "Qformer.bert.encoder.layer.0.output.dense.weight": torch.randn(16, 24),
                  "Qformer.bert.encoder.layer.0.output.LayerNorm.bias": torch.randn(16),
                  "Qformer.bert.embeddings.word_embeddings.weight": torch.randn(30, 16),
                  "Qformer.bert.embeddings.position_ids": torch.arange(8)[None],
                  "Qformer.cls.predictions.bias": torch.randn(30),
                  "visual_encoder.cls_token": torch.randn(1, 1, 16),
                  "temp": torch.tensor(0.07)})
    return model


def _eva_file(mods) -> dict[str, torch.Tensor]:
    eva = {k: v for k, v in _sd(mods["vision"]).items() if not k.startswith("ln_vision.")}
    # EVA-CLIP extras LAVIS skips with strict=False: block `depth` and the final norm.
    eva.update({f"blocks.{EVA.depth}.norm1.weight": torch.ones(16),
                f"blocks.{EVA.depth}.attn.qkv.weight": torch.randn(48, 16),
                "norm.weight": torch.ones(16), "norm.bias": torch.zeros(16)})
    return eva


def _write_dir(root: Path, mods, fmt: str = "safetensors",
               minigpt4_name: str = "pretrained_minigpt4_7b.pth") -> Path:
    root.mkdir(exist_ok=True)
    torch.save(_eva_file(mods), root / "eva_vit_g.pth")
    torch.save({"model": _blip2_model(mods)}, root / "blip2_pretrained_flant5xxl.pth")
    proj = _sd(mods["proj"])
    torch.save({"model": {"llama_proj.weight": proj["proj.weight"],
                          "llama_proj.bias": proj["proj.bias"]}}, root / minigpt4_name)
    _write_llm(root / "vicuna", _hf_llm(mods, with_buffers=fmt == "bin"), fmt)
    return root


@pytest.fixture(scope="module")
def mods():
    return _modules()


def _assert_equal(state, module, dtype=None):
    ref = _sd(module)
    assert set(state) == set(ref)
    for k, v in ref.items():
        torch.testing.assert_close(state[k], v.to(dtype or v.dtype), rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_roundtrip_every_module(tmp_path, mods, fmt):
    files = find_files(_write_dir(tmp_path / "ckpt", mods, fmt))
    assert read_llama_config(files.llm_dir) == LLM
    vis = vision_state(files, EVA)
    _assert_equal(vis.state, mods["vision"])
    ignored = {k for _, k, _ in vis.ignored}
    assert {"blocks.2.norm1.weight", "norm.weight"} <= ignored
    qf = qformer_state(files, QF)
    _assert_equal(qf.state, mods["qformer"])
    assert "t5_proj.weight" in {k for _, k, _ in qf.ignored}
    _assert_equal(projector_state(files, PROJ).state, mods["proj"])
    # The LLM folder is fp16 like the real one; compare in fp16.
    _assert_equal(embed_state(files, LLM, torch.float16).state, mods["embed"], torch.float16)
    full = _sd(mods["lm"])
    for start, stop in [(0, 2), (2, 4)]:
        got = decoder_group_state(files, LLM, start, stop, torch.float16).state
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


def test_decoder_group_reads_only_its_tensors(tmp_path, mods, monkeypatch):
    files = find_files(_write_dir(tmp_path / "ckpt", mods, "bin"))
    read: list[str] = []
    orig = checkpoints.ShardedSource.get
    monkeypatch.setattr(checkpoints.ShardedSource, "get",
                        lambda self, key: read.append(key) or orig(self, key))
    decoder_group_state(files, LLM, 2, 4)
    assert read and all(k.startswith(("model.layers.2.", "model.layers.3.")) or
                        k in ("model.norm.weight", "lm_head.weight") for k in read)
    assert "lm_head.weight" in read


def test_misspelled_minigpt4_file_is_found(tmp_path, mods):
    files = find_files(_write_dir(tmp_path / "c", mods, minigpt4_name="prerained_minigpt4_7b.pth"))
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


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_shard(tmp_path, mods, fmt):
    files = find_files(_write_dir(tmp_path / "ckpt", mods, fmt))
    shard = sorted(files.llm_dir.glob("*-00002-of-00003.*"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    decoder_group_state(files, LLM, 0, 2)  # untouched shard: fine
    with pytest.raises(CheckpointError, match=shard.name):
        decoder_group_state(files, LLM, 2, 4)
    with pytest.raises(CheckpointError, match=shard.name):
        check_llm_keys(files, LLM)


def test_missing_shard_named_with_index(tmp_path, mods):
    files = find_files(_write_dir(tmp_path / "ckpt", mods, "safetensors"))
    (files.llm_dir / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        embed_state(files, LLM)
    assert "model-00003-of-00003.safetensors" in str(err.value)
    assert "model.safetensors.index.json" in str(err.value)


def test_all_problems_in_one_error_with_both_shapes(tmp_path, mods):
    root = _write_dir(tmp_path / "ckpt", mods)
    eva = _eva_file(mods)
    eva["pos_embed"] = torch.zeros(1, 17, 16)  # e.g. a 448-px grid in a 224-px config
    del eva["blocks.1.mlp.fc2.bias"]
    torch.save(eva, root / "eva_vit_g.pth")
    with pytest.raises(CheckpointError) as err:
        vision_state(find_files(root), EVA)
    msg = str(err.value)
    assert "'pos_embed'" in msg and "[1, 17, 16]" in msg and "[1, 5, 16]" in msg
    assert "blocks.1.mlp.fc2.bias" in msg and "missing" in msg


def test_unmapped_key_is_an_error(tmp_path, mods):
    root = _write_dir(tmp_path / "ckpt", mods)
    eva = _eva_file(mods)
    eva["blocks.0.gamma_1"] = torch.ones(16)  # layer-scale would change the math
    torch.save(eva, root / "eva_vit_g.pth")
    with pytest.raises(CheckpointError, match=r"unmapped key .*'blocks\.0\.gamma_1' \[16\]"):
        vision_state(find_files(root), EVA)


def test_blip2_file_in_place_of_eva(tmp_path, mods):
    root = _write_dir(tmp_path / "ckpt", mods)
    (root / "eva_vit_g.pth").write_bytes((root / "blip2_pretrained_flant5xxl.pth").read_bytes())
    with pytest.raises(CheckpointError, match=r"eva_vit_g\.pth.*'model'.*right file"):
        vision_state(find_files(root), EVA)


def test_eva_file_in_place_of_blip2(tmp_path, mods):
    root = _write_dir(tmp_path / "ckpt", mods)
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
    root = _write_dir(tmp_path / "ckpt", mods)
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


def test_read_llama_config_rejects_other_models(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**HF_CONFIG, "model_type": "gpt2",
                                                      "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="not a Llama model"):
        read_llama_config(tmp_path)
    cfg = {k: v for k, v in HF_CONFIG.items() if k != "num_key_value_heads"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert read_llama_config(tmp_path).kv_heads == 4
