"""LLaVA-1.5's building blocks against implementations nobody here wrote.

- The CLIP tower and the mlp2x_gelu projector vs transformers' ``CLIPVisionModel`` /
  ``LlavaModel`` with the same weights, loaded by name: our names are transformers' names
  minus ``vision_model.`` (resp. ``vision_tower.vision_model.`` / ``multi_modal_projector.``),
  so the prefix strip below is the check that they mirror.
- Preprocessing vs transformers' PIL ``CLIPImageProcessor`` after LLaVA's ``expand2square``
  (written here from its definition), and prompt rendering / tokenization vs FastChat's
  SEP_STYLE.TWO and LLaVA's ``tokenizer_image_token`` semantics on a Hugging Face tokenizer.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import transformers as T
from PIL import Image

from vlm2om.exporters.core.onnx_export import export_onnx
from vlm2om.exporters.core.subgraph import Subgraph, TensorDecl
from vlm2om.graphs.clip_vit import ClipVisionConfig, ClipVisionTower
from vlm2om.graphs.projector import Bridge, MlpGeluProjector, MlpGeluProjectorConfig
from vlm2om.runtime.preprocess import preprocess
from vlm2om.runtime.prompts import Conversation, clean_answer, tokenize_prompt

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TINY = dict(image_size=56, patch_size=14, width=32, layers=3, heads=4, mlp_dim=64)
IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id between text chunks


def hf_clip_config(**over) -> T.CLIPVisionConfig:
    return T.CLIPVisionConfig(
        hidden_size=TINY["width"], intermediate_size=TINY["mlp_dim"], num_hidden_layers=TINY["layers"],
        num_attention_heads=TINY["heads"], image_size=TINY["image_size"], patch_size=TINY["patch_size"],
        hidden_act="quick_gelu", layer_norm_eps=1e-5, attn_implementation="eager", **over)


def jitter_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere, norms included (an all-ones norm would hide a swapped name)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
            p.copy_(base + torch.randn(p.shape, generator=gen) * 0.1)
    return module.eval()


def load_by_prefix(ours: torch.nn.Module, theirs: dict, prefixes: dict[str, str]) -> set[str]:
    """Load ``ours`` from a transformers state dict by swapping name prefixes (theirs -> ours);
    return the transformers keys left unused. transformers 4.x nests CLIP under ``vision_model.``
    (as the checkpoints do), 5.x does not: that level is dropped first."""
    mapped = {}
    for original, value in theirs.items():
        key = original.replace("vision_model.", "", 1) if original.startswith(("vision_model.", "vision_tower.")) \
            else original
        for theirs_prefix, ours_prefix in prefixes.items():
            if key.startswith(theirs_prefix):
                mapped[ours_prefix + key[len(theirs_prefix):]] = (original, value)
    want = ours.state_dict()
    missing = set(want) - set(mapped)
    assert not missing, f"our parameters with no transformers counterpart: {sorted(missing)}"
    ours.load_state_dict({k: mapped[k][1] for k in want}, strict=True)
    return set(theirs) - {mapped[k][0] for k in want}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"{tuple(a.shape)} vs {tuple(b.shape)}"
    return (a - b).abs().max().item()


# -------------------------------------------------------------------------- CLIP vision tower
def test_clip_config_real_size():
    cfg = ClipVisionConfig()
    assert (cfg.built_layers, cfg.num_tokens, cfg.num_positions) == (23, 576, 577)
    tower = ClipVisionTower(ClipVisionConfig(**{**TINY, "layers": 24}))
    assert len(tower.encoder.layers) == 23
    with pytest.raises(ValueError):
        ClipVisionConfig(select_layer=-26)


@pytest.mark.parametrize("select_layer", [-2, -1, 1])
@torch.no_grad()
def test_clip_tower_matches_hf_hidden_states(select_layer):
    cfg = ClipVisionConfig(**TINY, select_layer=select_layer)
    hf = jitter_(T.CLIPVisionModel(hf_clip_config()), seed=1)
    ours = ClipVisionTower(cfg).eval()
    unused = load_by_prefix(ours, hf.state_dict(), {"": ""})
    expected = {k for k in hf.state_dict() if k.replace("vision_model.", "", 1).startswith(
        ClipVisionTower.unused_checkpoint_keys(cfg))}
    assert unused == expected and any("post_layernorm" in k for k in unused)
    assert len(ours.encoder.layers) == cfg.built_layers

    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(2))
    ref = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[select_layer][:, 1:]
    diff = max_diff(ours(pixels), ref)
    assert diff < 1e-5, diff


@torch.no_grad()
def test_clip_tower_onnx_matches_torch(tmp_path):
    cfg = ClipVisionConfig(**TINY)
    tower = jitter_(ClipVisionTower(cfg), seed=3)
    sg = Subgraph(
        name="vision", build=lambda: tower,
        inputs=[TensorDecl("pixel_values", "float32", ("batch", 3, cfg.image_size, cfg.image_size))],
        outputs=[TensorDecl("image_features", "float32", ("batch", cfg.num_tokens, cfg.width))],
        make_inputs=lambda g, gen: {"pixel_values": torch.randn(g["batch"], 3, cfg.image_size,
                                                                cfg.image_size, generator=gen)},
        gears=[{"batch": 1}, {"batch": 2}])
    path = export_onnx(sg, tower, tmp_path)[0]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 2):
        x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(batch))
        got = sess.run(None, {"pixel_values": x.numpy()})[0]
        diff = max_diff(torch.from_numpy(got), tower(x))
        assert diff < 1e-5, (batch, diff)


# ------------------------------------------------------------------------------ projector
@torch.no_grad()
def test_mlp2x_gelu_and_bridge_match_hf_llava():
    vision = hf_clip_config()
    text = T.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4)
    cfg = T.LlavaConfig(vision_config=vision, text_config=text, projector_hidden_act="gelu",
                        vision_feature_layer=-2, vision_feature_select_strategy="default")
    hf = jitter_(T.LlavaModel(cfg), seed=4)

    proj = MlpGeluProjector(MlpGeluProjectorConfig(in_dim=TINY["width"], out_dim=48)).eval()
    unused = load_by_prefix(proj, hf.state_dict(), {"multi_modal_projector.": ""})
    assert not any(k.startswith("multi_modal_projector.") for k in unused)
    feats = torch.randn(2, 16, TINY["width"], generator=torch.Generator().manual_seed(5))
    d_proj = max_diff(proj(feats), hf.multi_modal_projector(feats))
    assert d_proj < 1e-5, d_proj

    # The whole image path: pixels -> tower (hidden_states[-2] minus CLS) -> projector.
    bridge = Bridge(ClipVisionTower(ClipVisionConfig(**TINY)), proj).eval()
    load_by_prefix(bridge, hf.state_dict(), {"vision_tower.": "encoder.",
                                             "multi_modal_projector.": "projector."})
    pixels = torch.randn(2, 3, TINY["image_size"], TINY["image_size"], generator=torch.Generator().manual_seed(6))
    ref = torch.stack(list(hf.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                                 vision_feature_select_strategy="default").pooler_output))
    d_all = max_diff(bridge(pixels), ref)
    assert d_all < 1e-5, d_all


# -------------------------------------------------------------------------- preprocessing
def llava_expand2square(img: Image.Image, background: tuple) -> Image.Image:
    """LLaVA's definition: square canvas of the longer side, image pasted centred (floored)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), background)
    canvas.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return canvas


def synthetic_image(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Gradients plus noise: smooth areas and sharp edges both reach the bicubic filter."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 64 * 4], -1)
    arr = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def llava_steps(size: int, pad: bool) -> list[dict]:
    fill = [int(x * 255) for x in CLIP_MEAN]
    return [{"op": "rgb"}, *([{"op": "pad_to_square", "fill": fill}] if pad else []),
            {"op": "resize_shortest", "size": size, "interpolation": "bicubic"},
            {"op": "center_crop", "size": [size, size]},
            {"op": "to_float", "divisor": 255.0}, {"op": "normalize", "mean": CLIP_MEAN, "std": CLIP_STD}]


@pytest.mark.parametrize("pad", [True, False], ids=["expand2square", "no-pad"])
def test_llava_preprocess_matches_clip_image_processor(pad):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size=336, do_center_crop=True,
                                 image_mean=CLIP_MEAN, image_std=CLIP_STD)
    fill = tuple(int(x * 255) for x in proc.image_mean)
    assert fill == (122, 116, 104)
    sizes = [(173, 61, "RGB"), (61, 173, "RGB"), (301, 300, "RGB"), (500, 337, "RGB"), (97, 97, "RGB"),
             (1000, 457, "L"), (80, 333, "RGBA")]
    worst = 0.0
    for i, (w, h, mode) in enumerate(sizes):
        img = synthetic_image(w, h, seed=i, mode=mode)
        rgb = img.convert("RGB")  # LLaVA loads every image with .convert('RGB')
        ref = proc(llava_expand2square(rgb, fill) if pad else rgb, return_tensors="np")["pixel_values"]
        ours = preprocess(img, llava_steps(336, pad))
        assert ours.shape == ref.shape == (1, 3, 336, 336) and ours.dtype == np.float32
        worst = max(worst, float(np.abs(ours - ref).max()))
    assert worst < 1e-5, worst


def test_center_crop_pads_like_transformers():
    from transformers.image_transforms import center_crop

    img = synthetic_image(21, 30, seed=9)
    ours = preprocess(img, [{"op": "center_crop", "size": [32, 26]}, {"op": "to_float", "divisor": 1.0}])
    ref = center_crop(np.asarray(img).transpose(2, 0, 1), (26, 32)).astype(np.float32)
    np.testing.assert_array_equal(ours[0], ref)


# -------------------------------------------------------------------------------- prompts
VICUNA_V1 = {
    "template": "vicuna_v1", "style": "two",
    "system": "A chat between a curious user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "roles": ["USER", "ASSISTANT"], "sep": " ", "sep2": "</s>",
    "image_message": "<image>", "image_message_end": "<image>", "image_join": "\n",
    "image_placeholder": "<image>", "bos": "first", "specials": {"</s>": 2}, "legacy": False,
    "stop_strings": ["</s>"],
}
LLAVA_V1 = {**VICUNA_V1, "template": "llava_v1",
            "system": "A chat between a curious human and an artificial intelligence assistant. "
                      "The assistant gives helpful, detailed, and polite answers to the human's questions."}


def two_turns(spec: dict) -> tuple[str, str]:
    conv = Conversation(spec)
    conv.add_image()
    conv.ask("What is this?")
    first = conv.render()
    conv.answer("A cat.")
    conv.ask("Its colour?")
    return first, conv.render()


@pytest.mark.parametrize("spec", [VICUNA_V1, LLAVA_V1], ids=["vicuna_v1", "llava_v1"])
def test_two_style_rendering(spec):
    first, second = two_turns(spec)
    system = spec["system"]
    assert first == f"{system} USER: <image>\nWhat is this? ASSISTANT:"
    assert second == f"{system} USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: Its colour? ASSISTANT:"
    text_only = Conversation(spec)
    text_only.ask("Hi")
    assert text_only.render() == f"{system} USER: Hi ASSISTANT:"
    assert "curious user" in VICUNA_V1["system"] and "human's questions" in LLAVA_V1["system"]


@pytest.fixture(scope="module")
def tiny_tokenizers(tmp_path_factory):
    """(our SentencePiece tokenizer, transformers' LlamaTokenizer per legacy flag) on one model."""
    from vlm2om.exporters.core.tiny_tokenizer import build_tiny_tokenizer
    from vlm2om.runtime.tokenizer import SentencePieceTokenizer

    d = tmp_path_factory.mktemp("tok")
    (d / "tokenizer.model").write_bytes(build_tiny_tokenizer())
    hf = {legacy: T.LlamaTokenizer.from_pretrained(str(d), legacy=legacy, add_bos_token=True)
          for legacy in (False, True)}
    return SentencePieceTokenizer(d / "tokenizer.model", 1, 2), hf


def llava_token_ids(prompt: str, hf_tok) -> list[int]:
    """tokenizer_image_token as LLaVA defines it: every chunk tokenized with BOS, the first chunk's
    BOS kept, later chunks' BOS dropped, IMAGE_TOKEN_INDEX between chunks."""
    chunks = [hf_tok(c).input_ids for c in prompt.split("<image>")]
    assert all(c[0] == hf_tok.bos_token_id for c in chunks)
    ids = list(chunks[0])
    for c in chunks[1:]:
        ids += [IMAGE_TOKEN_INDEX, *c[1:]]
    return ids


@pytest.mark.parametrize("legacy", [False, True], ids=["non-legacy", "legacy"])
def test_two_style_tokens_match_llava_tokenizer_image_token(tiny_tokenizers, legacy):
    ours, hf = tiny_tokenizers
    spec = {**VICUNA_V1, "legacy": legacy}
    for prompt in two_turns(spec):
        conv_segments = prompt.split(spec["image_placeholder"])
        segs = tokenize_prompt(ours, conv_segments, spec)
        flat = list(segs[0])
        for s in segs[1:]:
            flat += [IMAGE_TOKEN_INDEX, *s]
        assert flat == llava_token_ids(prompt, hf[legacy]), prompt
    assert 2 in flat  # the multi-turn "</s>" became EOS, not the characters "</s>"


def test_two_style_clean_answer():
    assert clean_answer(" A cat sits on a mat. ", VICUNA_V1) == "A cat sits on a mat."
    assert clean_answer("A cat.</s>USER: more", VICUNA_V1) == "A cat."
