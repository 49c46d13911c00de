"""InternLM-XComposer2 checkpoint loading on tiny folders written in the published layout from the
original key names (tests/helpers/ixc2_checkpoints.py): both variants in both file formats build
modules holding exactly the folder's tensors, a CLIP-size position table is resized as transformers'
own bicubic interpolation does, the LoRA alphas come from adapter_config.json or the original's
constants, and every kind of bad folder fails before any tensor is read, naming file and key."""
from __future__ import annotations

import json

import pytest
import torch
import transformers as T

from tests.helpers.ixc2_checkpoints import ALPHAS, CLIP, RANKS, VIT, grid, write_ixc2_checkpoint
from vlm2om.exporters.core.checkpoints import CheckpointError
from vlm2om.exporters.core.options import Gears
from vlm2om.exporters.core.tiny_tokenizer import build_tiny_tokenizer
from vlm2om.exporters.families.ixc2.checkpoint import PLORA_CONSTANTS, lora_settings, resize_positions
from vlm2om.exporters.families.ixc2.loader import load_parts
from vlm2om.exporters.families.ixc2.options import ExportOptions, HdExportOptions
from vlm2om.graphs.clip_vit import ClipVisionTower
from vlm2om.graphs.internlm2 import lora_table
from vlm2om.graphs.ixc2_vision import HdViewConfig
from vlm2om.graphs.projector import MlpGeluProjectorConfig

GEARS = Gears(seq=(1, 16), cache=(64,), layers_per_group=1)
OPTIONS = {"vl": ExportOptions, "4khd": HdExportOptions}
IGNORED = ("attention.rotary_emb.inv_freq", "embeddings.position_ids", "post_layernorm.")


def _load(root, variant, **kw):
    return load_parts(OPTIONS[variant](preset=None, checkpoint=root, **{"dtype": "float32", **kw}), GEARS)


def _error(root, variant, **kw) -> str:
    with pytest.raises(CheckpointError) as err:
        _load(root, variant, **kw)
    return str(err.value)


def _same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and torch.equal(got, want), what


@pytest.mark.parametrize("layout", ["bin", "safetensors"])
@pytest.mark.parametrize("variant", ["vl", "4khd"])
def test_both_variants_build_the_folders_tensors(tmp_path, variant, layout):
    root = tmp_path / f"internlm-xcomposer2-{variant}-7b"
    state = write_ixc2_checkpoint(root, variant, seed=3, layout=layout)
    parts = _load(root, variant)

    assert parts.variant == variant and parts.tokenizer == (root / "tokenizer.model").read_bytes()
    side = grid(variant) * CLIP["patch_size"]  # 70 px (img_size) for VL, the CLIP folder's 56 for 4KHD
    assert (parts.vision_cfg.image_size, parts.vision_cfg.num_positions, parts.vision_cfg.built_layers) == \
        (side, grid(variant) ** 2 + 1, 2)
    assert parts.vision_cfg.select_layer == -1 and not parts.vision_cfg.keep_cls
    assert parts.proj_cfg == (MlpGeluProjectorConfig(32, 64) if variant == "vl" else HdViewConfig(4, 32, 64))
    cfg = parts.llm.llama
    assert (cfg.vocab_size, cfg.hidden, cfg.layers, cfg.kv_heads, cfg.rope_theta, cfg.rms_eps) == \
        (514, 64, 2, 2, 1e6, 1e-5)
    assert (cfg.rope_scaling, cfg.rope_factor) == ((None, 1.0) if variant == "vl" else ("dynamic", 2.0))
    assert cfg.lora == lora_table(**{k: (RANKS[variant][k], ALPHAS[variant][k]) for k in RANKS[variant]})

    src = parts.source
    assert src["layout"] == f"{layout} + index" and src["variant"] == variant
    assert src["specials"] == {"[UNUSED_TOKEN_145]": 512, "[UNUSED_TOKEN_146]": 513} and src["eos_ids"] == [2, 512]
    assert parts.llm.spec.tokenizer["eos_ids"] == [2, 512]
    assert src["position_embedding"] == {"rows": grid(variant) ** 2 + 1, "resized": False}
    assert src["lora"]["wqkv"]["alpha_from"].endswith("adapter_config.json: " + (
        "lora_alpha" if variant == "vl" else "alpha_pattern"))
    assert src["clip_config"] == str(root / "clip-vit-large-patch14-336" / "config.json") + ": vision_config"
    ignored = src["ignored_keys"]  # inv_freq x 2 layers, position_ids, post_layernorm weight and bias
    assert len(ignored) == 2 + 1 + 2 and all(any(s in line for s in IGNORED) for line in ignored)

    vision, proj, embed = parts.build_vision(), parts.build_projector(), parts.llm.build_embed()
    groups = [parts.llm.build_group(i) for i in range(len(parts.llm.bounds))]
    assert parts.llm.bounds == [(0, 1), (1, 2)]
    _same(embed.tok_embeddings.weight, state["model.tok_embeddings.weight"], "tok_embeddings")
    for i, g in enumerate(groups):
        layer, p = g.layers[0], f"model.layers.{i}."
        _same(layer.attention.wqkv.weight, state[p + "attention.wqkv.weight"], "wqkv")
        _same(layer.attention.wqkv.Plora_A.weight, state[p + "attention.wqkv.Plora_A.weight"], "wqkv A")
        _same(layer.attention.wqkv.Plora_B.weight, state[p + "attention.wqkv.Plora_B.weight"], "wqkv B")
        _same(layer.attention.wo.Plora_B.weight, state[p + "attention.wo.Plora_B.weight"], "wo B")
        _same(layer.feed_forward.w2.Plora_A.weight, state[p + "feed_forward.w2.Plora_A.weight"], "w2 A")
        _same(layer.ffn_norm.weight, state[p + "ffn_norm.weight"], "ffn_norm")
        assert layer.attention.wqkv.scaling == ALPHAS[variant]["wqkv"] / RANKS[variant]["wqkv"]
    _same(groups[1].norm.weight, state["model.norm.weight"], "norm")
    _same(groups[1].output.weight, state["output.weight"], "output")
    _same(vision.embeddings.position_embedding.weight, state[VIT + "embeddings.position_embedding.weight"], "pos")
    _same(vision.embeddings.patch_embedding.weight, state[VIT + "embeddings.patch_embedding.weight"], "patch")
    _same(vision.encoder.layers[1].mlp.fc2.bias, state[VIT + "encoder.layers.1.mlp.fc2.bias"], "fc2")
    _same(vision.pre_layrnorm.weight, state[VIT + "pre_layrnorm.weight"], "pre_layrnorm")
    mlp = proj if variant == "vl" else proj.proj
    _same(mlp.linear_1.weight, state["vision_proj.0.weight"], "vision_proj.0")
    _same(mlp.linear_2.bias, state["vision_proj.2.bias"], "vision_proj.2")
    if variant == "4khd":
        _same(proj.glb_GN, state["plora_glb_GN"], "glb_GN")
        _same(proj.sub_GN, state["plora_sub_GN"], "sub_GN")
    # Nothing else was left unread: every parameter built is a tensor of the folder, once.
    built = sum(p.numel() for m in (vision, proj, embed, *groups) for p in m.parameters())
    assert built == sum(t.numel() for k, t in state.items() if not any(s in k for s in IGNORED))


def test_fp16_single_file_exports_at_fp16(tmp_path):
    """A single model.safetensors, stored fp16 as published: read at fp16, exported at the default float16."""
    root = tmp_path / "vl"
    state = write_ixc2_checkpoint(root, "vl", layout="safetensors", shards=1, dtype=torch.float16, buffers=False)
    parts = _load(root, "vl", dtype=None)
    why = "(after hidden_states[-1]: never affects InternLM-XComposer2's features)"
    assert parts.source["layout"] == "safetensors" and sorted(parts.source["ignored_keys"]) == \
        [f"{root / 'model.safetensors'}: {VIT}post_layernorm.{p} {why}" for p in ("bias", "weight")]
    group = parts.llm.build_group(0)
    _same(group.layers[0].attention.wqkv.Plora_B.weight, state["model.layers.0.attention.wqkv.Plora_B.weight"].half(),
          "fp16 wqkv B")
    assert parts.build_vision().pre_layrnorm.weight.dtype == torch.float32  # LayerNorm32 stays fp32


@torch.no_grad()
def test_vl_clip_size_table_is_resized_like_transformers(tmp_path):
    """A 17-row (CLIP-size) table for the 70 px tower: our resize equals transformers'
    CLIPVisionEmbeddings.interpolate_pos_encoding (the same bicubic rule, independently written).
    Exact with the fp16 rounding off; the loader's table is that, rounded to fp16 as the original."""
    root = tmp_path / "vl"
    state = write_ixc2_checkpoint(root, "vl", seed=5, pos_rows="clip")
    parts = _load(root, "vl")
    assert parts.source["position_embedding"]["resized"] and parts.source["position_embedding"]["rows"] == 17
    assert parts.source["position_embedding"]["to_rows"] == 26

    hf = T.CLIPVisionModel(T.CLIPVisionConfig(**CLIP, attn_implementation="eager")).eval()
    nested = "vision_model." if any(k.startswith("vision_model.") for k in hf.state_dict()) else ""
    tower = {k[len(VIT):]: v for k, v in state.items() if k.startswith(VIT) and not k.endswith("position_ids")}
    hf.load_state_dict({nested + k: v for k, v in tower.items()}, strict=True)
    pixels = torch.randn(1, 3, 70, 70, generator=torch.Generator().manual_seed(0))
    want = hf(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states[-1][:, 1:]

    raw = tower["embeddings.position_embedding.weight"]
    exact = ClipVisionTower(parts.vision_cfg).eval()
    exact.load_state_dict({**{k: v for k, v in tower.items() if not k.startswith("post_layernorm.")},
                           "embeddings.position_embedding.weight": resize_positions(raw, 5, round_to=None)})
    assert (exact(pixels) - want).abs().max().item() < 1e-5

    ours = parts.build_vision()
    _same(ours.embeddings.position_embedding.weight, resize_positions(raw, 5).float(), "fp16-rounded table")
    got = ours(pixels)
    assert got.shape == want.shape == (1, 25, 32)
    assert (got - want).abs().max().item() < 1e-3 * want.abs().max().item()  # fp16 rounding of the table only


def test_clip_folder_beside_given_or_absent(tmp_path):
    root = tmp_path / "beside" / "internlm-xcomposer2-vl-7b"
    write_ixc2_checkpoint(root, "vl", clip="beside")
    assert _load(root, "vl").source["clip_config"].startswith(str(tmp_path / "beside" / "clip-vit-large-patch14-336"))
    bare = tmp_path / "bare"
    write_ixc2_checkpoint(bare, "vl", clip=None)
    given = _load(bare, "vl", clip=str(root.parent / "clip-vit-large-patch14-336"))
    assert given.vision_cfg.width == 32
    msg = _error(bare, "vl")  # CLIP-L/14-336's published sizes do not fit the tiny tower
    assert "CLIP ViT-L/14-336's published config" in msg and "width 32" in msg and "1024" in msg


def test_lora_constants_rule():
    """Without adapter_config.json: the original's constants, where the ranks are theirs."""
    real = dict.fromkeys(("wqkv", "wo", "w1", "w2", "w3"), 256)
    table, info = lora_settings({**real, "wqkv": 8}, "4khd", None, "weights", 32)
    assert table == PLORA_CONSTANTS["4khd"] == lora_table(wqkv=(8, 16))
    constants = "the original InternLM-XComposer2-4KHD's PLoRA constants"
    assert info["wqkv"] == {"r": 8, "alpha": 16, "alpha_from": constants}
    assert lora_settings(real, "vl", None, "weights", 32)[0] == lora_table((256, 256))
    with pytest.raises(CheckpointError, match=r"attention\.wqkv\.Plora_A has rank 256.*r 8, alpha 16.*adapter_config"):
        lora_settings(real, "4khd", None, "weights", 32)
    per_layer = {"r": 256, "lora_alpha": 256, "alpha_pattern": {r"layers\.0\.attention\.wo": 8}}
    with pytest.raises(CheckpointError, match="different values in different layers"):
        lora_settings(real, "vl", per_layer, "adapter_config.json", 32)


def test_lora_refusals(tmp_path):
    write_ixc2_checkpoint(tmp_path / "none", "vl", adapter_config=False)
    msg = _error(tmp_path / "none", "vl")
    assert "rank 4" in msg and "r 256, alpha 256" in msg and "adapter_config.json" in msg
    write_ixc2_checkpoint(tmp_path / "bad", "4khd", adapter_config={"r": 4, "lora_alpha": 8})
    msg = _error(tmp_path / "bad", "4khd")
    assert "adapter_config.json: r gives attention.wqkv rank 4, but its Plora_A weights have rank 2" in msg

    def odd_rank(state):  # layer 1's wo trained at another rank
        state["model.layers.1.attention.wo.Plora_A.weight"] = torch.randn(3, 64)
        state["model.layers.1.attention.wo.Plora_B.weight"] = torch.randn(64, 3)
        return state
    write_ixc2_checkpoint(tmp_path / "odd", "vl", edit=odd_rank)
    assert "'model.layers.1.attention.wo.Plora_A.weight' has rank 3, layer 0's has 4" in _error(tmp_path / "odd", "vl")


def _edited(tmp_path, name, variant="vl", **kw):
    root = tmp_path / name
    write_ixc2_checkpoint(root, variant, **kw)
    return root


def test_unmapped_missing_and_misshaped_keys_in_one_error(tmp_path):
    def edit(state):
        state["model.image_newline"] = torch.zeros(64)
        del state["model.layers.1.feed_forward.w3.Plora_B.weight"]
        state["vision_proj.2.bias"] = torch.zeros(8)
        return state
    root = _edited(tmp_path, "faults", edit=edit)
    msg = _error(root, "vl")
    assert f"unmapped key in {root}: 'model.image_newline' [64]" in msg
    assert f"missing in {root}: 'model.layers.1.feed_forward.w3.Plora_B.weight'" in msg
    assert "'vision_proj.2.bias' is [8]" in msg and "expects [64]" in msg and "3 problem(s)" in msg


@pytest.mark.parametrize("over,hint", [
    ({"intermediate_size": 96}, "LLM has intermediate size 128; the options say 96"),
    ({"vocab_size": 600}, "LLM has a vocabulary of 514; the options say 600"),
    ({"num_key_value_heads": 4}, "wqkv rows"),
])
def test_bad_shapes_lead_with_the_sizes(tmp_path, over, hint):
    msg = _error(_edited(tmp_path, "sizes", config_over=over), "vl")
    assert "shape mismatch" in msg and hint in msg and "config.json" in msg


def test_bias_disagreement_is_named(tmp_path):
    state = write_ixc2_checkpoint(tmp_path / "biased", "vl", bias=True)  # config.bias true: wqkv and wo only
    attention = _load(tmp_path / "biased", "vl").llm.build_group(1).layers[0].attention
    _same(attention.wo.bias, state["model.layers.1.attention.wo.bias"], "wo bias")
    msg = _error(_edited(tmp_path, "bias", bias=True, config_over={"bias": False}), "vl")
    assert "unmapped key" in msg and "attention.wqkv.bias" in msg and "bias=false" in msg


@pytest.mark.parametrize("written,expected,words", [
    ("4khd", "vl", "is an InternLM-XComposer2-4KHD checkpoint (it has plora_glb_GN); export it as ixc2-4khd"),
    ("vl", "4khd", "is an InternLM-XComposer2-VL checkpoint (it has no plora_glb_GN and its vision_proj.0.weight "
                   "takes 32 inputs); export it as ixc2-vl"),
])
def test_variant_mismatch(tmp_path, written, expected, words):
    assert words in _error(_edited(tmp_path, "other", written), expected)


def test_4khd_without_separators_is_still_4khd(tmp_path):
    root = _edited(tmp_path, "nogn", "4khd", edit=lambda s: {k: v for k, v in s.items() if "GN" not in k})
    assert "takes 128 = 4 x 32 inputs" in _error(root, "vl")
    msg = _error(root, "4khd")
    assert "missing in" in msg and "'plora_glb_GN'" in msg and "'plora_sub_GN'" in msg


def test_missing_files(tmp_path):
    root = _edited(tmp_path, "shard")
    (root / "pytorch_model-00002-of-00002.bin").unlink()
    msg = _error(root, "vl")
    assert "pytorch_model.bin.index.json" in msg and "missing: pytorch_model-00002-of-00002.bin" in msg
    root = _edited(tmp_path, "notok", tokenizer=False)
    assert str(root / "tokenizer.model") in _error(root, "vl")
    root = _edited(tmp_path, "llamatok")
    (root / "tokenizer.model").write_bytes(build_tiny_tokenizer())
    assert "has no [UNUSED_TOKEN_145] piece" in _error(root, "vl")


@pytest.mark.parametrize("over,words", [
    ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling type 'yarn' is not supported"),
    ({"rope_scaling": {"type": "linear", "factor": 0.5}}, "rope_scaling factor 0.5 must be a number >= 1"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": 32}, "dynamic NTK RoPE"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings=true"),
    ({"img_size": 84}, "has 26 rows; the tower at 84 px needs 37"),
    ({"img_size": 75}, "img_size=75"),
    ({"num_hidden_layers": None}, "missing field(s) num_hidden_layers"),
    ({"model_type": "internlmxcomposer2d5", "architectures": ["InternLMXComposer2ForCausalLM"]}, "XComposer2.5"),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "not an InternLM-XComposer2 config"),
])
def test_unsupported_configs_are_refused(tmp_path, over, words):
    root = _edited(tmp_path, "cfg")
    raw = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**raw, **over}))
    assert words in _error(root, "vl")
