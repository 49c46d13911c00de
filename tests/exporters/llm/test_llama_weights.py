"""A Hugging Face Llama (Vicuna) folder read group by group: only a group's tensors are read,
a damaged or missing shard is named with its index, a config that is not Llama is refused."""
from __future__ import annotations

import json

import pytest

from tests.helpers.minigpt4_tiny import HF_CONFIG, LLM, modules, write_vicuna
from vlm2om.exporters.core import checkpoints
from vlm2om.exporters.core.checkpoints import CheckpointError
from vlm2om.exporters.llm.llama_weights import check_llm_keys, decoder_group_state, embed_state, read_llama_config


@pytest.fixture(scope="module")
def mods():
    return modules()


def test_decoder_group_reads_only_its_tensors(tmp_path, mods, monkeypatch):
    folder = write_vicuna(tmp_path / "vicuna", mods, "bin")
    read: list[str] = []
    orig = checkpoints.ShardedSource.get
    monkeypatch.setattr(checkpoints.ShardedSource, "get",
                        lambda self, key: read.append(key) or orig(self, key))
    decoder_group_state(folder, LLM, 2, 4)
    assert read and all(k.startswith(("model.layers.2.", "model.layers.3.")) or
                        k in ("model.norm.weight", "lm_head.weight") for k in read)
    assert "lm_head.weight" in read


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_shard(tmp_path, mods, fmt):
    folder = write_vicuna(tmp_path / "vicuna", mods, fmt)
    shard = sorted(folder.glob("*-00002-of-00003.*"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    decoder_group_state(folder, LLM, 0, 2)  # untouched shard: fine
    with pytest.raises(CheckpointError, match=shard.name):
        decoder_group_state(folder, LLM, 2, 4)
    with pytest.raises(CheckpointError, match=shard.name):
        check_llm_keys(folder, LLM)


def test_missing_shard_named_with_index(tmp_path, mods):
    folder = write_vicuna(tmp_path / "vicuna", mods, "safetensors")
    (folder / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        embed_state(folder, LLM)
    assert "model-00003-of-00003.safetensors" in str(err.value)
    assert "model.safetensors.index.json" in str(err.value)


def test_read_llama_config_rejects_other_models(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**HF_CONFIG, "model_type": "gpt2",
                                                      "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="not a Llama model"):
        read_llama_config(tmp_path)
    cfg = {k: v for k, v in HF_CONFIG.items() if k != "num_key_value_heads"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert read_llama_config(tmp_path).kv_heads == 4
