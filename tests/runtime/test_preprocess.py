"""runtime/preprocess.py against implementations nobody here wrote: transformers' PIL
``CLIPImageProcessor`` after LLaVA's ``expand2square`` (written from its definition), its
``center_crop``, and the MiniGPT-4 torch reference's pixels."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.images import CLIP_MEAN, CLIP_STD, llava_steps, llava_expand2square, synthetic_image
from vlm2om.runtime.preprocess import preprocess



def test_preprocess_matches_torch_reference(tiny_bundle, tiny_modules, sample_image):
    import json

    from vlm2om.exporters.families import get_family

    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    ours = preprocess(sample_image, manifest["preprocess"]["steps"])
    ref = get_family("minigpt4").Reference(tiny_modules, manifest).pixels(sample_image).numpy()
    assert ours.shape == (1, 3, 224, 224) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


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


