"""LLaVA-1.5 checkpoint loading: every published layout, written at toy size in the real key names
and file formats, maps to the same weights; a bad folder fails naming every problem at once."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers.llava_tiny import (IMAGE_TOKEN, IMAGE_TOKENS, TEXT, VISION, hf_config, hf_llava,
                                      original_config, parts, write_llava_hf, write_llava_original)

from vlm2om.exporters.families.llava15 import recipe as llava
from vlm2om.exporters.core.checkpoints import CheckpointError
from vlm2om.exporters.core.driver import write_bundle
from vlm2om.exporters.llm.llama_weights import LLAMA_DEFAULTS, decoder_group_state, embed_state, llama_config
from vlm2om.exporters.families.llava15.checkpoint import check_checkpoint, clip_config, open_checkpoint, projector_state, vision_state
from vlm2om.graphs.clip_vit import ClipVisionConfig
from vlm2om.graphs.llama import LlamaConfig
from vlm2om.runtime import open_bundle
from vlm2om.runtime.preprocess import preprocess
from vlm2om.runtime.prompts import Conversation, tokenize_prompt

LAYOUTS = {  # name -> (writer, expected layout, key of one ignored tensor)
    "hf-saved": (lambda d, m: write_llava_hf(d, m, "saved"), "llava-hf",
                 "vision_tower.post_layernorm.weight"),
    "hf-old": (lambda d, m: write_llava_hf(d, m, "old"), "llava-hf",
               "vision_tower.vision_model.encoder.layers.2.mlp.fc1.bias"),
    "hf-new": (lambda d, m: write_llava_hf(d, m, "new"), "llava-hf",
               "model.vision_tower.vision_model.post_layernorm.bias"),
    "orig-bin": (lambda d, m: write_llava_original(d, m, "bin"), "llava",
                 "model.layers.0.self_attn.rotary_emb.inv_freq"),
    "orig-st-beside": (lambda d, m: write_llava_original(d, m, "safetensors", clip_beside=True), "llava",
                       "model.vision_tower.vision_tower.vision_model.pre_layrnorm.weight"),
}


@pytest.fixture(scope="module")
def model():
    return hf_llava(seed=1)


def _close(got: dict, want: dict) -> None:
    """The checkpoints store fp16 (as the real ones): equal to fp16 rounding, every name present."""
    assert set(got) == set(want), set(got) ^ set(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k].float(), v.float(), atol=2e-3, rtol=2e-3, msg=k)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_maps_the_same_weights(tmp_path, model, name):
    write, layout, ignored_key = LAYOUTS[name]
    ck = open_checkpoint(write(tmp_path / "llava-v1.5-7b", model))
    assert ck.layout == layout and ck.pad_to_square and not ck.legacy
    assert (ck.llama.vocab_size, ck.llama.kv_heads, ck.llama.rms_eps) == (TEXT["vocab_size"], 2, 1e-5)
    assert (ck.vision.built_layers, ck.vision.num_tokens, ck.vision.act) == (2, 16, "quick_gelu")
    ignored = check_checkpoint(ck)
    assert any(line.split(": ", 1)[1].startswith(ignored_key + " (") for line in ignored), ignored
    p = parts(model)
    built = {k: v for k, v in p["vision"].items() if not k.startswith(("post_layernorm", "encoder.layers.2."))}
    _close(vision_state(ck).state, built)
    _close(projector_state(ck).state, p["projector"])
    llm = p["llm"]
    _close(embed_state(ck.root, ck.llama, keys=ck.llm_keys).state, {"embed_tokens.weight": llm["embed_tokens.weight"]})
    last = decoder_group_state(ck.root, ck.llama, 1, 2, keys=ck.llm_keys).state
    _close(last, {"layers.0." + k[len("layers.1."):]: v for k, v in llm.items() if k.startswith("layers.1.")}
           | {"norm.weight": llm["norm.weight"], "lm_head.weight": llm["lm_head.weight"]})


@torch.no_grad()
def test_original_layout_exports_at_fp16_like_transformers(tmp_path, model, sample_image):
    """The default for a checkpoint is float16; the bundle stays within fp16 error of the fp32 HF model."""
    ckpt = write_llava_original(tmp_path / "llava-v1.5-7b", model, "bin")
    opts = llava.ExportOptions(preset=None, checkpoint=ckpt, seq_gears=(1, 16, 64), cache_gears=(128, 256))
    plan = llava.plan(opts)
    assert plan.variant == "llava-v1.5-7b" and plan.provenance["source"]["layout"] == "llava"
    pipe = open_bundle(write_bundle(plan, tmp_path / "bundle", echo=lambda s: None).root)
    m = pipe.bundle.manifest
    assert m["dtype"] == m["kv_cache"]["dtype"] == "float16" and m["prompt"]["legacy"] is False
    assert m["pipeline"]["image_graphs"] == ["vision", "projector"] and m["pipeline"]["image_tokens"] == 16

    pixels = torch.from_numpy(preprocess(sample_image, m["preprocess"]["steps"]))
    want = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                          vision_feature_select_strategy="default").pooler_output
    want = torch.stack(list(want))[0].numpy()
    got = pipe.encode_image(sample_image).astype(np.float32)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2  # measured 5.8e-4

    # The prompt with the image spliced: LLaVA's ids with the image token repeated, for HF.
    conv = Conversation(pipe.prompt)
    conv.add_image()
    conv.ask("What is it?")
    seg0, seg1 = tokenize_prompt(pipe.tokenizer, conv.segments(), pipe.prompt)
    ref = model(input_ids=torch.tensor([seg0 + [IMAGE_TOKEN] * IMAGE_TOKENS + seg1]), pixel_values=pixels).logits
    ref = ref[0, -1].numpy()
    layout, (logits,) = pipe.chat(sample_image).score("What is it?", [0])  # the prompt's next-token logits
    assert layout.length == len(seg0) + IMAGE_TOKENS + len(seg1)
    assert np.linalg.norm(logits - ref) / np.linalg.norm(ref) < 1e-2  # measured 5.6e-4
    assert int(np.argmax(logits)) == int(np.argmax(ref))


def _error(path) -> str:
    with pytest.raises(CheckpointError) as err:
        check_checkpoint(open_checkpoint(path))
    return str(err.value)


def test_missing_clip_folder_and_files_are_named(tmp_path, model):
    root = write_llava_original(tmp_path / "llava-v1.5-7b", model, "bin")
    clip = root / "clip-vit-large-patch14-336"
    for f in clip.iterdir():
        f.unlink()
    clip.rmdir()
    (root / "tokenizer.model").unlink()
    msg = _error(root)
    assert str(clip) in msg and str(tmp_path / "clip-vit-large-patch14-336") in msg
    assert "openai/clip-vit-large-patch14-336" in msg and "tokenizer.model" in msg


def test_all_problems_of_a_folder_in_one_error(tmp_path, model):
    root = write_llava_hf(tmp_path / "hf", model, "new")
    tensors = load_file(str(root / "model.safetensors"))
    tensors["model.image_newline"] = torch.zeros(TEXT["hidden_size"])  # LLaVA-1.6's: not ours
    tensors["model.multi_modal_projector.linear_2.weight"] = torch.zeros(8, 8)
    del tensors["model.language_model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(root / "model.safetensors"))
    msg = _error(root)
    assert "unmapped key" in msg and "'model.image_newline' [64]" in msg
    assert "'model.multi_modal_projector.linear_2.weight' is [8, 8]" in msg and "[64, 64]" in msg
    assert "missing" in msg and "model.language_model.layers.1.mlp.up_proj.weight" in msg
    assert "3 problem(s)" in msg


def test_clip_folder_is_checked_key_by_key(tmp_path, model):
    root = write_llava_original(tmp_path / "llava", model, "bin")
    path = root / "clip-vit-large-patch14-336" / "pytorch_model.bin"
    weights = torch.load(path, weights_only=True)
    weights["vision_model.encoder.layers.0.layer_scale"] = torch.ones(VISION["hidden_size"])
    torch.save(weights, path)
    msg = _error(root)
    assert "pytorch_model.bin: 'vision_model.encoder.layers.0.layer_scale' [32]" in msg


@pytest.mark.parametrize("change,message", [
    ({"mm_projector_type": "linear"}, "mm_projector_type='linear'"),
    ({"mm_use_im_start_end": True}, "mm_use_im_start_end=True"),
    ({"image_aspect_ratio": "anyres"}, "anyres"),
    ({"model_type": "llava_mpt", "architectures": ["LlavaMptForCausalLM"]}, "Llama LLM"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE type 'linear'"),
])
def test_unsupported_original_configs_are_refused(tmp_path, model, change, message):
    root = write_llava_original(tmp_path / "llava", model, "bin")
    (root / "config.json").write_text(json.dumps(original_config(**change)))
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(root)


@pytest.mark.parametrize("change,message", [
    ({"vision_feature_layer": [-2, -5]}, "vision_feature_layer"),
    ({"projector_hidden_act": "silu"}, "mlp2x_gelu"),
    ({"text_config": {"model_type": "mistral"}}, "only a Llama LLM"),
    ({"vision_config": {"model_type": "siglip_vision_model"}}, "LLaVA-1.5's tower is CLIP"),
])
def test_unsupported_hf_configs_are_refused(tmp_path, model, change, message):
    root = write_llava_hf(tmp_path / "hf", model, "old")
    (root / "config.json").write_text(json.dumps(hf_config(**change)))
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(root)


def test_unknown_folders_are_refused(tmp_path, model):
    with pytest.raises(CheckpointError, match="no config.json"):
        open_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="neither an original LLaVA config"):
        open_checkpoint(tmp_path)
    root = write_llava_hf(tmp_path / "hf", model, "new")
    tensors = load_file(str(root / "model.safetensors"))
    tensors = {k.replace("model.language_model.", "llm."): v for k, v in tensors.items()}
    save_file(tensors, str(root / "model.safetensors"))
    with pytest.raises(CheckpointError, match="neither llava-hf key scheme"):
        open_checkpoint(root)


def test_published_real_size_configs():
    """config.json as the two 7B checkpoints publish it (llava-hf's nested configs are sparse:
    transformers' defaults fill them) gives the real-size graphs."""
    text = {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
            "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
            "torch_dtype": "float16", "vocab_size": 32064}
    vision = {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
              "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
              "vocab_size": 32000}
    vicuna = LlamaConfig(vocab_size=32064, rms_eps=1e-5, max_positions=4096)
    assert llama_config(text, "text_config", LLAMA_DEFAULTS) == vicuna
    assert clip_config(vision, "vision_config", -2, False) == ClipVisionConfig()
    assert ClipVisionConfig().num_tokens == 576
    real = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
    assert llama_config(original_config(**real), "config.json") == LlamaConfig(
        vocab_size=32000, rms_eps=1e-5, max_positions=4096)
    with pytest.raises(CheckpointError, match="missing field"):
        llama_config({"vocab_size": 10}, "config.json")  # top-level configs must be complete
