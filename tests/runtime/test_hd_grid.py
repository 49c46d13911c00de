"""4KHD's image path in the runtime (runtime/hd_grid.py) against the original's rules written out
in tests/helpers/ixc2_original.py and the family reference: ``HD_transform`` and ``padding_336`` of
``ixc_utils.py`` (Pillow's bilinear resize and white padding, the transposes kept), the
global view by torch's own ``F.interpolate``, and ``build_mlp.py``'s layout of the whole image
(merge, separators, then ``vision_proj``) against the per-view graph module laid out by the runtime."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from tests.helpers.images import synthetic_image
from tests.helpers.ixc2_original import original_hd_layout, original_hd_transform
from vlm2om.graphs.common import init_random_
from vlm2om.graphs.ixc2_vision import HdViewConfig, HdViewProjector
from vlm2om.runtime import hd_grid
from vlm2om.runtime.errors import InputError
from vlm2om.runtime.preprocess import preprocess

# (width, height): square, landscape, portrait, a panorama, a tall strip, a thin line, odd sizes.
SIZES = [(336, 336), (500, 300), (300, 500), (1600, 200), (120, 900), (2000, 9), (37, 41), (1000, 999)]


@pytest.mark.parametrize("hd_num", [1, 9, 25, 55])
@pytest.mark.parametrize("size", SIZES)
def test_hd_transform_is_the_originals_pixel_for_pixel(size, hd_num):
    img = synthetic_image(*size, seed=size[0] + hd_num)
    want = original_hd_transform(img, hd_num, 336)
    got = hd_grid.hd_transform(img, hd_num, 336, (255, 255, 255))
    assert got.size == want.size
    assert np.array_equal(np.asarray(got), np.asarray(want))
    h, w = got.size[1] // 336, got.size[0] // 336
    assert h * w <= hd_num


@pytest.mark.parametrize("shape, out", [((1, 3, 1008, 1680), 336), ((1, 3, 336, 672), 336), ((1, 3, 3696, 336), 336),
                                        ((1, 3, 56, 112), 56), ((1, 3, 30, 50), 70), ((1, 2, 7, 5), 3)])
def test_global_view_is_torch_bicubic_interpolate(shape, out):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 2
    want = F.interpolate(torch.from_numpy(x), size=(out, out), mode="bicubic", align_corners=False).numpy()
    np.testing.assert_allclose(hd_grid.bicubic(x, out, out), want, rtol=0, atol=1e-5)


def test_views_are_the_global_view_then_row_major_crops():
    x = np.random.default_rng(1).standard_normal((1, 3, 2 * 56, 3 * 56)).astype(np.float32)
    views, grid = hd_grid.views(x, 56)
    assert grid == (2, 3) and len(views) == 7
    t = torch.from_numpy(x)
    crops = t.reshape(1, 3, 2, 56, 3, 56).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, 56, 56)  # build_mlp.py
    for i in range(6):
        assert np.array_equal(views[1 + i], crops[i:i + 1].numpy())
    np.testing.assert_allclose(views[0], F.interpolate(t, size=(56, 56), mode="bicubic").numpy(), atol=1e-5)


@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (3, 1), (1, 5)])
@torch.no_grad()
def test_layout_of_projected_views_is_the_originals_projected_sequence(grid):
    """build_mlp.py merges all views, inserts sub_GN after every row and glb_GN between the global
    view and the crops, then projects the sequence; the runtime projects views apart and lays out."""
    h, w = grid
    cfg = HdViewConfig(grid=4, width=8, hidden=16)
    m = init_random_(HdViewProjector(cfg), 5, 0.3).eval()
    feats = torch.randn(1 + h * w, 16, 8)  # the tower's tokens of the global view, then the crops
    seq = original_hd_layout(feats, h, w, m.glb_GN, m.sub_GN)
    want = m.proj(seq)[0].numpy()

    outs = [m(feats[i:i + 1])[0].numpy() for i in range(1 + h * w)]
    spec = {"tokens_per_side": 2, "global_separator_row": 4, "row_separator_row": 5}
    got = hd_grid.layout(outs, grid, spec)
    assert got.shape[0] == hd_grid.rows(grid, 2) == (h * w + 1) * 4 + 1 + (h + 1) * 2
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_row_count_formula_at_real_size():
    """L = (h*w + 1) * 144 + 1 + (h + 1) * 12: 1 x 1 crop is 313 rows, 5 x 5 is 3817."""
    assert hd_grid.rows((1, 1), 12) == 313 and hd_grid.rows((5, 5), 12) == 3817


def test_preprocess_step_and_its_hd_num_override():
    steps = [{"op": "rgb"}, {"op": "hd_transform", "hd_num": 4, "size": 56, "fill": [255, 255, 255]},
             {"op": "to_float", "divisor": 255.0}]
    img = synthetic_image(200, 90, seed=2)
    x = preprocess(img, steps)
    want = np.asarray(original_hd_transform(img, 4, 56), np.float32) / 255
    assert np.array_equal(x, want.transpose(2, 0, 1)[None])
    assert preprocess(img, steps, hd_num=1).shape == (1, 3, 56, 56)


def test_refusals_name_the_problem():
    with pytest.raises(InputError, match="too elongated for hd_num 1"):
        hd_grid.hd_transform(synthetic_image(2000, 2, seed=0), 1, 336, (255, 255, 255))
    with pytest.raises(InputError, match="hd_num must be between 1 and"):
        hd_grid.hd_transform(synthetic_image(20, 20, seed=0), 0, 336, (255, 255, 255))
    with pytest.raises(InputError, match="not a grid of 56-pixel views"):
        hd_grid.views(np.zeros((1, 3, 56, 60), np.float32), 56)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("hd_num", [1, 25, 55])
def test_grid_from_the_header_is_the_grid_hd_transform_makes(size, hd_num):
    """What a prompt check counts before any pixel is decoded."""
    if hd_grid.hd_size(max(size), min(size), hd_num, 56)[1] < 1:
        pytest.skip("too elongated: hd_transform refuses it (test_refusals_name_the_problem)")
    img = hd_grid.hd_transform(synthetic_image(*size, seed=1), hd_num, 56, (255, 255, 255))
    assert hd_grid.grid_of(size, hd_num, 56) == (img.size[1] // 56, img.size[0] // 56)
