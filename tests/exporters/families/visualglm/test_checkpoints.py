"""VisualGLM-6B checkpoint loading on tiny checkpoints written in both published layouts (HF folder,
SAT folder from SwissArmyTransformer's own modules): the modules load_parts builds equal, bitwise,
the ones whose weights went in, the two layouts give the same modules (SAT's qkv rows permuted),
and every kind of bad checkpoint fails before any tensor is read, naming the file and key."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.helpers.visualglm_checkpoints import (BOS, EOS, EVA, GLM, QF, hf_config, hf_state, modules, sat_model,
                                                 sat_model_config, write_hf, write_sat)
from vlm2om.exporters.core import checkpoints
from vlm2om.exporters.core.checkpoints import CheckpointError
from vlm2om.exporters.core.options import Gears
from vlm2om.exporters.families.visualglm.loader import load_parts
from vlm2om.exporters.families.visualglm.options import ExportOptions
from vlm2om.exporters.llm.chatglm import tokenizer_entry
from vlm2om.exporters.llm.chatglm_weights import contiguous_to_interleaved
from vlm2om.graphs.chatglm import ChatGLMDecoderGroup

GEARS = Gears(seq=(1, 16, 64), cache=(128, 256), layers_per_group=1, kv_layout="per_layer")


@pytest.fixture(scope="module")
def mods():
    return modules()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, mods):
    return write_hf(tmp_path_factory.mktemp("hf") / "visualglm-6b", mods)


@pytest.fixture(scope="module")
def sat_state(mods):
    return {k: v.detach().clone() for k, v in sat_model(mods).state_dict().items()}


@pytest.fixture(scope="module")
def sat_dir(tmp_path_factory, sat_state):
    return write_sat(tmp_path_factory.mktemp("sat") / "visualglm-6b", sat_state)


def _load(path, **kw):
    return load_parts(ExportOptions(checkpoint=path, dtype="float32", **kw), GEARS)


def _built(parts) -> dict[str, dict[str, torch.Tensor]]:
    """Every graph's module state (parameters and buffers) from the parts' builders."""
    out = {f"vision_{i}": parts.build_vision(i) for i in range(len(parts.vision_bounds))}
    out["bridge"], out["embed"] = parts.build_bridge(), parts.llm.build_embed()
    out.update({f"group_{i}": parts.llm.build_group(i) for i in range(len(parts.llm.bounds))})
    return {k: {**dict(m.named_parameters()), **dict(m.named_buffers())} for k, m in out.items()}


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == torch.float32 == v.dtype, k
        assert torch.equal(got[k], v), k


def _slice(state: dict[str, torch.Tensor], start: int, stop: int, keep) -> dict[str, torch.Tensor]:
    """``state``'s layers [start, stop) renumbered from 0, plus the other names ``keep`` accepts."""
    out = {}
    for k, v in state.items():
        if k.startswith("layers."):
            _, j, rest = k.split(".", 2)
            if start <= int(j) < stop:
                out[f"layers.{int(j) - start}.{rest}"] = v
        elif keep(k):
            out[k] = v
    return out


def _expected(mods, parts) -> dict[str, dict[str, torch.Tensor]]:
    vision = mods["vision"].state_dict()
    want = {}
    for i, (a, b) in enumerate(parts.vision_bounds):
        # The slice from 0 holds the embeddings, the one that ends the ViT ln_vision.
        want[f"vision_{i}"] = _slice(vision, a, b, lambda k, a=a, b=b: b == EVA.depth if k.startswith("ln_vision.")
                                     else a == 0)
    want["bridge"] = {**{f"encoder.{k}": v for k, v in mods["qformer"].state_dict().items()},
                      **{f"projector.{k}": v for k, v in mods["proj"].state_dict().items()}}
    want["embed"] = dict(mods["embed"].state_dict())
    rope = max(GEARS.rope_length, GLM.max_positions)
    for i, (a, b) in enumerate(parts.llm.bounds):
        ref = ChatGLMDecoderGroup(GLM, a, b, rope)  # its RoPE buffers, computed off the meta device
        want[f"group_{i}"] = {**_slice(mods["glm"].state_dict(), a, b, lambda k: b == GLM.layers),
                              **dict(ref.named_buffers())}
    return want


def test_hf_folder_builds_the_modules_it_holds(hf_dir, mods):
    parts = _load(hf_dir)
    assert (parts.vision_cfg, parts.qformer_cfg, parts.llm.spec.cfg) == (EVA, QF, GLM)  # from config.json
    assert parts.vision_bounds == [(0, 1), (1, 2)] and parts.llm.bounds == [(0, 1), (1, 2)]
    assert parts.llm.spec.tokenizer == tokenizer_entry(BOS, EOS, 0)
    assert parts.tokenizer == (hf_dir / "ice_text.model").read_bytes()
    assert parts.source["layout"] == "hf" and parts.source["checkpoint"] == str(hf_dir)
    ignored = parts.source["ignored_keys"]
    assert len(ignored) == GLM.layers and all("rotary_emb.inv_freq" in line and "RoPE" in line for line in ignored)
    got, want = _built(parts), _expected(mods, parts)
    assert set(got) == set(want)
    for name in want:
        _same(got[name], want[name])


def test_sat_folder_equals_the_hf_folder(sat_dir, hf_dir, mods, sat_state):
    # The SAT state dict is SAT's own: contiguous GLM qkv rows, the eva mixin's prefixes.
    qkv = "transformer.layers.0.attention.query_key_value.weight"
    assert {"mixins.chatglm-attn.rotary_emb.inv_freq", "mixins.chatglm-final.lm_head.weight",
            "mixins.eva.model.vit.mixins.cls.ln_vision.weight",
            "mixins.eva.model.qformer.transformer.layers.0.cross_attention.key_value.weight",
            "mixins.eva.model.glm_proj.weight"} <= set(sat_state)
    ours = mods["glm"].state_dict()["layers.0.attention.query_key_value.weight"]
    assert not torch.equal(sat_state[qkv], ours) and torch.equal(contiguous_to_interleaved(sat_state[qkv], 4), ours)
    sat, hf = _load(sat_dir), _load(hf_dir)
    assert sat.source["layout"] == "sat" and sat.source["checkpoint"] == str(sat_dir)
    assert [line.split(": ", 1)[1].split(" ")[0] for line in sat.source["ignored_keys"]] == \
        ["mixins.chatglm-attn.rotary_emb.inv_freq"]
    assert (sat.vision_cfg, sat.qformer_cfg, sat.llm.spec.cfg) == (EVA, QF, GLM)
    assert sat.llm.spec.tokenizer == hf.llm.spec.tokenizer == tokenizer_entry(BOS, EOS, 0)
    got, want = _built(sat), _built(hf)
    assert set(got) == set(want)
    for name in want:
        _same(got[name], want[name])
    _same(got["group_0"], _expected(mods, sat)["group_0"])


def test_sat_release_tag_and_the_pt_file_itself(tmp_path, sat_state, hf_dir):
    folder = write_sat(tmp_path / "sat", sat_state, tag="release")
    pt = folder / "release" / "mp_rank_00_model_states.pt"
    ref = _built(_load(hf_dir))
    for path in (folder, pt):
        parts = _load(path)
        _same(_built(parts)["group_1"], ref["group_1"])
        assert parts.source["layout"] == "sat"


def test_sat_tokenizer_option_and_parent_folder(tmp_path, sat_state, hf_dir):
    folder = write_sat(tmp_path / "ckpt" / "visualglm-6b", sat_state, tokenizer=False)
    with pytest.raises(CheckpointError) as err:
        _load(folder)
    msg = str(err.value)
    assert str(folder / "ice_text.model") in msg and str(folder.parent / "ice_text.model") in msg
    assert "--tokenizer" in msg
    tok = tmp_path / "elsewhere.model"
    shutil.copy(hf_dir / "ice_text.model", tok)
    assert _load(folder, tokenizer=str(tok)).tokenizer == tok.read_bytes()
    shutil.copy(tok, folder.parent / "ice_text.model")
    assert _load(folder).tokenizer == tok.read_bytes()


def _reads(monkeypatch) -> list[str]:
    """Keys whose tensor data is read from a shard folder from now on."""
    read: list[str] = []
    orig = checkpoints.ShardedSource.get
    monkeypatch.setattr(checkpoints.ShardedSource, "get", lambda self, key: read.append(key) or orig(self, key))
    return read


def test_extra_key_fails_before_any_read(tmp_path, mods, monkeypatch):
    state = {**hf_state(mods), "image_encoder.vit.transformer.layers.0.attention.extra.weight": torch.zeros(2)}
    folder = write_hf(tmp_path / "hf", state=state)
    read = _reads(monkeypatch)
    with pytest.raises(CheckpointError, match=r"unmapped key in .*hf: 'image_encoder\.vit\.transformer\.layers\.0"
                                              r"\.attention\.extra\.weight' \[2\]"):
        _load(folder)
    assert read == []


def test_missing_key(tmp_path, mods):
    state = hf_state(mods)
    del state["image_encoder.glm_proj.bias"]
    with pytest.raises(CheckpointError, match=r"missing in .*hf: 'image_encoder\.glm_proj\.bias' "
                                              r"\(for our 'proj\.bias'\)"):
        _load(write_hf(tmp_path / "hf", state=state))


def test_missing_sat_key_names_the_pt_file(tmp_path, sat_state):
    state = {k: v for k, v in sat_state.items() if k != "mixins.chatglm-final.lm_head.weight"}
    folder = write_sat(tmp_path / "sat", state)
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt\['module'\]: "
                                              r"'mixins\.chatglm-final\.lm_head\.weight'"):
        _load(folder)


def test_wrong_shape_leads_with_the_sizes(tmp_path, mods):
    config = {**hf_config(), "inner_hidden_size": 96}
    with pytest.raises(CheckpointError) as err:
        _load(write_hf(tmp_path / "hf", mods, config=config))
    msg = str(err.value)
    assert "the checkpoint's ChatGLM has inner size 128; the options say 96 (read from" in msg
    assert "config.json" in msg
    assert "shape mismatch: 'transformer.layers.0.mlp.dense_h_to_4h.weight' is [128, 64]" in msg


def test_wrong_vision_depth_names_the_eva_config(tmp_path, mods):
    config = hf_config()
    config["eva_config"] = {**config["eva_config"], "num_layers": 3}
    with pytest.raises(CheckpointError, match=r"the checkpoint's EVA ViT has 2 layers; the options say 3 "
                                              r"\(eva_config in .*config\.json\)"):
        _load(write_hf(tmp_path / "hf", mods, config=config))


@pytest.mark.parametrize("tokenizer_config", [{"num_image_tokens": 20000}, {}])
def test_wrong_tokenizer_offset(tmp_path, mods, tokenizer_config):
    """An explicit offset, or none (ChatGLMTokenizer's default num_image_tokens is 20000)."""
    folder = write_hf(tmp_path / "hf", mods, tokenizer_config=tokenizer_config)
    with pytest.raises(CheckpointError) as err:
        _load(folder)
    msg = str(err.value)
    assert str(folder / "ice_text.model") in msg
    assert f"<sop> is piece {BOS}, + id offset 20000" in msg and f"= {BOS + 20000}" in msg
    assert f"bos_token_id {BOS}" in msg


def test_sat_config_bos_against_tokenizer(tmp_path, sat_state):
    folder = write_sat(tmp_path / "sat", sat_state, config={**sat_model_config(), "bos_token_id": 130004})
    with pytest.raises(CheckpointError, match=r"ice_text\.model: <sop> is piece 388, \+ id offset 0 .* = 388, "
                                              r"but .*model_config\.json says bos_token_id 130004"):
        _load(folder)


def test_missing_shard(tmp_path, mods):
    folder = write_hf(tmp_path / "hf", mods)
    (folder / "pytorch_model-00002-of-00003.bin").unlink()
    with pytest.raises(CheckpointError, match=r"missing: pytorch_model-00002-of-00003\.bin"):
        _load(folder)


def test_sat_latest_names_a_missing_iteration(tmp_path, sat_state):
    folder = write_sat(tmp_path / "sat", sat_state)
    (folder / "latest").write_text("4000")
    with pytest.raises(CheckpointError, match=r"4000/mp_rank_00_model_states\.pt: missing \(named by .*latest"):
        _load(folder)


def test_builders_read_only_their_own_tensors(hf_dir, monkeypatch):
    parts = _load(hf_dir)
    read = _reads(monkeypatch)
    parts.build_vision(1)
    assert read and all(k.startswith(("image_encoder.vit.transformer.layers.1.", "image_encoder.vit.mixins.cls."))
                        for k in read)
    read.clear()
    parts.llm.build_group(0)
    assert read and all(k.startswith("transformer.layers.0.") for k in read)


def test_not_a_visualglm_folder(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(CheckpointError, match="not a VisualGLM-6B checkpoint"):
        _load(tmp_path / "x")
    folder = tmp_path / "y"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**hf_config(), "model_type": "llama"}))
    (folder / "ice_text.model").write_bytes(b"")
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a ChatGLM model"):
        _load(folder)


def test_float16_export_keeps_layernorms_fp32(hf_dir, mods):
    parts = load_parts(ExportOptions(checkpoint=hf_dir, dtype="float16"), GEARS)
    vision, group = parts.build_vision(0), parts.llm.build_group(1)
    assert vision.layers[0].attention.query_key_value.weight.dtype == torch.float16
    assert vision.layers[0].input_layernorm.weight.dtype == torch.float32
    assert torch.equal(vision.layers[0].input_layernorm.weight, mods["vision"].layers[0].input_layernorm.weight)
    assert group.lm_head.weight.dtype == torch.float16 and group.final_layernorm.weight.dtype == torch.float32
    bridge = parts.build_bridge()
    assert bridge.projector.proj.weight.dtype == torch.float16
    assert torch.equal(bridge.projector.proj.weight, mods["proj"].proj.weight.half())
