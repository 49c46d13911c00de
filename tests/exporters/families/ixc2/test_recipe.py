"""The InternLM-XComposer2 recipes' tiny presets through the whole path: the manifest contract
(4KHD's per-view graphs and ``hd_grid`` assembly, positions counted in the graph), the real gears
against ATC's limits, the fake ATC + ais_bench stand-in (same tokens as onnxruntime), and the CLI
as ``make export MODEL=ixc2-4khd`` runs it, then chat, verify and bench."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.cli_flow import export_run_chat_verify_bench
from tests.helpers.om_compare import om_and_ort_answers
from vlm2om.exporters.families.ixc2 import recipe
from vlm2om.runtime import Bundle, GenerationConfig

GREEDY = GenerationConfig(max_new_tokens=12, do_sample=False, stop_on_eos=False, stop_strings=())


def test_4khd_manifest_declares_views_and_their_layout(ixc2_4khd_bundle):
    m = Bundle.open(ixc2_4khd_bundle).manifest
    assert (m["family"], m["variant"]) == ("ixc2-4khd", "tiny")
    p = m["pipeline"]
    assert p["image_tokens"] is None and p["image_output"] == "view_embeds"
    assert p["image_assembly"] == {"kind": "hd_grid", "view_size": 56, "global_resize": "bicubic",
                                   "tokens_per_side": 2, "global_separator_row": 4, "row_separator_row": 5}
    for name in ("vision", "projector"):  # the views run in batches of 1, 2, 4 or 8
        assert m["graphs"][name]["gears"] == [{"batch": b} for b in (1, 2, 4, 8)]
    assert m["graphs"]["vision"]["inputs"][0]["shape"] == ["batch", 3, 56, 56]
    assert m["graphs"]["projector"]["outputs"][0]["shape"] == ["batch", 6, 64]
    roles = {s["role"] for s in m["graphs"]["decoder_0"]["inputs"]}
    assert "positions" not in roles and "image_mask" in roles  # positions counted from the valid mask


def test_vl_manifest(ixc2_vl_bundle):
    m = Bundle.open(ixc2_vl_bundle).manifest
    assert m["pipeline"]["image_tokens"] == 25 and "image_assembly" not in m["pipeline"]
    assert m["graphs"]["projector"]["outputs"][0]["shape"] == [1, 25, 64]


def test_real_gears_fit_atc_and_the_largest_hd_image():
    """At most 20 gears per decoder graph; the 4KHD cache holds an 11 x 5 grid (hd_num 55, 8209 rows)
    with text and a 1024-token answer."""
    for variant, g in recipe.REAL_GEARS.items():
        assert len(g.seq) * len(g.cache) <= 20, variant
    assert (11 * 5 + 1) * 144 + 1 + 12 * 12 + 1024 < max(recipe.REAL_GEARS["4khd"].cache)


@pytest.mark.parametrize("fixture", ["ixc2_vl_bundle", "ixc2_4khd_bundle"])
def test_om_stand_in_gives_the_same_tokens_as_onnxruntime(fixture, request, tmp_path, monkeypatch, sample_image):
    answers, modes, sessions = om_and_ort_answers(request.getfixturevalue(fixture), tmp_path, monkeypatch,
                                                  sample_image, ("Describe this image.", "What else?"), GREEDY)
    assert answers["om"] == answers["ort"]
    vl = fixture == "ixc2_vl_bundle"
    assert modes["vision"] == modes["projector"] == ("static" if vl else "dymdims") and modes["decoder_0"] == "dymdims"
    runs = [c["shapes"][0][0] for s in sessions if Path(s.model_path).name.startswith("vision") for c in s.calls]
    assert runs == ([1] if vl else [8, 8, 4, 1])  # 4KHD: the sample image's 1 + 4 x 5 views, never padded


@pytest.mark.parametrize("family, run_args", [("ixc2-vl", ()), ("ixc2-4khd", ("--hd-num", "4"))])
def test_cli_export_run_chat_verify_bench(family, run_args, tmp_path, sample_image):
    export_run_chat_verify_bench(family, tmp_path, sample_image, "Describe this image.", "And the colours?",
                                 run_args=run_args, bench_input=600)  # the meta instruction and the image: ~540


def test_the_last_decoder_file_holds_one_layer_beside_the_output():
    """Two layers beside the 92544-row output peaked at 3.13 GiB in the full-size export."""
    from vlm2om.exporters.llm.internlm2 import internlm2_bounds
    from vlm2om.graphs.internlm2 import InternLM2Config

    bounds = internlm2_bounds(InternLM2Config(), recipe.REAL_GEARS["vl"])
    assert bounds[-1] == (31, 32) and bounds[-2] == (30, 31) and len(bounds) == 17


def test_the_prompt_check_counts_hd_rows_from_the_image_header(ixc2_4khd_bundle):
    """Before any graph loads: the rows an image makes at the hd_num asked for, counted from its size."""
    from vlm2om.runtime import InputError
    from vlm2om.runtime.pipeline import check_prompt

    b = Bundle.open(ixc2_4khd_bundle)
    check_prompt(b, "Describe it.", image_sizes=[(100, 100)], hd_num=1)
    rows = (17 * 17 + 1) * 4 + 1 + (17 + 1) * 2  # a square at hd_num 300: 17 x 17 crops of 2 x 2 tokens
    with pytest.raises(InputError, match=rf"tokens \(\d+ text \+ {rows} image\)"):
        check_prompt(b, "Describe it.", image_sizes=[(100, 100)], hd_num=300)


def test_cli_hd_num_is_refused_where_no_image_is_cut(tiny_bundle, sample_image):
    from click.testing import CliRunner

    from vlm2om.exporters.cli.main import main

    r = CliRunner().invoke(main, ["run", str(tiny_bundle), "--image", str(sample_image), "--prompt", "Hi",
                                  "--hd-num", "4"])
    assert r.exit_code != 0 and "--hd-num applies to bundles that cut images into views" in r.output
