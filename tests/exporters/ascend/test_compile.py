"""`vlm2om compile`: golden ATC commands, and runs against a fake ATC (no CANN here):
recorded OM files and commands, the compile cache, verbatim ATC errors, no-ATC fallback."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import run_cli
from tests.helpers.bundles import copy_bundle
from tests.helpers.fake_cann import install_fake_cann
from tests.helpers.no_torch import no_torch_env
from vlm2om.exporters.ascend import atc
from vlm2om.exporters.ascend.compile import CompileError, CompileOptions, atc_version, compile_bundle
from vlm2om.runtime import Bundle

DECODER = {
    "file": "decoder_0.onnx",
    "inputs": [{"name": "hidden_states", "dtype": "float32", "shape": [1, "seq", 64]},
               {"name": "position_ids", "dtype": "int64", "shape": [1, "seq"]},
               {"name": "attention_mask", "dtype": "float32", "shape": [1, "cache"]},
               {"name": "past_kv", "dtype": "float32", "shape": [1, 2, 1, 4, "cache", 16]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, "seq", 512]}],
    "gears": [{"seq": 1, "cache": 128}, {"seq": 1, "cache": 256}, {"seq": 16, "cache": 256}],
}
VISION = {"file": "vision.onnx", "gears": None,
          "inputs": [{"name": "pixel_values", "dtype": "float32", "shape": [1, 3, 224, 224]}],
          "outputs": [{"name": "image_embeds", "dtype": "float32", "shape": [1, 257, 1408]}]}


def test_golden_command_geared_decoder():
    args = atc.atc_args("decoder_0", DECODER, soc="Ascend910B3", keep_dtype=atc.keep_dtype_file("decoder_0"))
    assert atc.render(args) == (
        "atc --model=decoder_0.onnx --framework=5 --output=om/decoder_0 --soc_version=Ascend910B3 "
        "--input_format=ND "
        "'--input_shape=hidden_states:1,-1,64;position_ids:1,-1;attention_mask:1,-1;past_kv:1,2,1,4,-1,16' "
        "'--dynamic_dims=1,1,128,128;1,1,256,256;16,16,256,256' "
        "--precision_mode=force_fp16 --keep_dtype=om/decoder_0.keep_dtype")


def test_golden_command_static_vision():
    assert atc.render(atc.atc_args("vision", VISION)) == (
        'atc --model=vision.onnx --framework=5 --output=om/vision --soc_version="${SOC_VERSION}" '
        "--input_format=ND --input_shape=pixel_values:1,3,224,224 --precision_mode=force_fp16")


def test_script_writes_keep_dtype_lists_and_skips_them_where_ignored():
    graphs, plan = {"vision": VISION, "decoder_0": DECODER}, {"decoder_0": ["/norm/Pow", "/norm/ReduceMean"]}
    script = atc.compile_script(graphs, keep_dtype=plan, soc="Ascend310P3")
    assert 'SOC_VERSION="${SOC_VERSION:-Ascend310P3}"' in script
    assert "cat > om/decoder_0.keep_dtype <<'EOF'\n/norm/Pow\n/norm/ReduceMean\nEOF\n" in script
    assert script.count("--keep_dtype=") == 1  # vision has no fp16-risky nodes in this plan
    assert "--keep_dtype" not in atc.compile_script(graphs, keep_dtype=plan, precision="must_keep_origin_dtype")


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    return copy_bundle(tiny_bundle, tmp_path)


@pytest.fixture
def cann(tmp_path, monkeypatch):
    return install_fake_cann(tmp_path / "Ascend", monkeypatch)


def test_compile_runs_atc_and_records_om_files(bundle_copy, cann):
    out = []
    res = compile_bundle(bundle_copy, CompileOptions(soc="Ascend910B3"), echo=out.append)
    names = list(json.loads((bundle_copy / "manifest.json").read_text())["graphs"])
    assert res.built == names and res.cached == [] and res.atc_version == "7.0.0"
    calls = cann.calls()
    assert [Path(c["cwd"]) for c in calls] == [bundle_copy.resolve()] * len(names)  # run from the ONNX folder
    dec = next(c["argv"] for c in calls if "--model=decoder_0.onnx" in c["argv"])
    assert "--output=om/decoder_0" in dec and "--soc_version=Ascend910B3" in dec
    assert "--dynamic_dims=1,1,128,128;1,1,256,256;16,16,128,128;16,16,256,256;64,64,128,128;64,64,256,256" in dec
    assert "--keep_dtype=om/decoder_0.keep_dtype" in dec
    keep = (bundle_copy / "om" / "decoder_0.keep_dtype").read_text().split()
    assert "/layers.0/input_layernorm/Pow" in keep and "/layers.0/self_attn/Softmax" in keep

    bundle = Bundle.open(bundle_copy)  # every recorded file, OM included, passes its sha256 check
    om = bundle.manifest["atc"]["om"]["decoder_0"]
    assert om["file"] == "om/decoder_0_linux_x86_64.om"  # found by glob: ATC added the suffix
    assert bundle.manifest["files"][om["file"]]["sha256"] == om["sha256"]
    assert om["command"] == atc.render(["atc", *dec])
    assert om["atc_version"] == "7.0.0" and om["soc"] == "Ascend910B3"
    assert "om/decoder_0.keep_dtype" in bundle.manifest["files"]
    assert any(line.startswith("[1/5] vision: atc") for line in out)
    assert "ATC run success, welcome to the next use." in out  # ATC's own output, passed through


def test_compile_cache_skips_what_is_up_to_date(bundle_copy, cann):
    compile_bundle(bundle_copy, CompileOptions(), echo=lambda s: None)
    n = len(cann.calls())
    res = compile_bundle(bundle_copy, CompileOptions(), echo=lambda s: None)
    assert res.built == [] and len(res.cached) == n and len(cann.calls()) == n

    res = compile_bundle(bundle_copy, CompileOptions(soc="Ascend310P3"), echo=lambda s: None)
    assert len(res.built) == n  # another SoC: every graph again
    cann.set_version("8.0.RC1")
    res = compile_bundle(bundle_copy, CompileOptions(soc="Ascend310P3"), echo=lambda s: None)
    assert len(res.built) == n and res.atc_version == "8.0.RC1"
    res = compile_bundle(bundle_copy, CompileOptions(soc="Ascend310P3", precision="must_keep_origin_dtype"),
                         echo=lambda s: None)
    assert len(res.built) == n  # other flags
    (bundle_copy / "om" / "embed_linux_x86_64.om").unlink()
    res = compile_bundle(bundle_copy, CompileOptions(soc="Ascend310P3", precision="must_keep_origin_dtype"),
                         echo=lambda s: None)
    assert res.built == ["embed"]  # a deleted OM is rebuilt, the others are kept
    assert sorted(p.name for p in (bundle_copy / "om").glob("*.om")) == sorted(
        f"{g}_linux_x86_64.om" for g in ("vision", "bridge", "embed", "decoder_0", "decoder_1"))
    res = compile_bundle(bundle_copy, CompileOptions(soc="Ascend310P3", precision="must_keep_origin_dtype",
                                                     force=True), echo=lambda s: None)
    assert len(res.built) == n
    Bundle.open(bundle_copy)


def test_atc_errors_pass_through_verbatim(bundle_copy, cann, monkeypatch):
    monkeypatch.setenv("FAKE_ATC_FAIL", "decoder_0")
    out = []
    with pytest.raises(CompileError, match=r"atc failed on graph 'decoder_0' \(exit 1\)") as e:
        compile_bundle(bundle_copy, CompileOptions(), echo=out.append)
    assert ("E19010: [PID: 4242] No parser is registered for Op [/fake/Op, optype [ai.onnx::13::FakeOp]]."
            in out)
    assert "--model=decoder_0.onnx" in str(e.value) and "hint: an op this ATC cannot parse" in str(e.value)
    m = Bundle.open(bundle_copy).manifest  # what was built before the failure is kept, and valid
    assert sorted(m["atc"]["om"]) == ["bridge", "embed", "vision"]
    monkeypatch.delenv("FAKE_ATC_FAIL")
    assert compile_bundle(bundle_copy, CompileOptions(), echo=lambda s: None).built == ["decoder_0", "decoder_1"]


def test_without_atc_the_script_is_refreshed(bundle_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(CompileError, match="ATC is needed") as e:
        compile_bundle(bundle_copy, CompileOptions(soc="Ascend310P3"), echo=lambda s: None)
    assert "compile_om.sh" in str(e.value)
    script = (bundle_copy / "compile_om.sh").read_text()
    assert 'SOC_VERSION="${SOC_VERSION:-Ascend310P3}"' in script and "--keep_dtype=om/vision.keep_dtype" in script
    m = Bundle.open(bundle_copy).manifest  # the refreshed script's hash is recorded
    assert m["atc"]["default_soc"] == "Ascend310P3" and m["atc"]["om"] == {}
    assert "om/decoder_1.keep_dtype" in m["atc"]["commands"]["decoder_1"]
    assert m["atc"]["keep_dtype"]["decoder_1"][0].startswith("/layers.0/")


def test_lint_errors_stop_the_compile(bundle_copy, cann):
    mpath = bundle_copy / "manifest.json"
    m = json.loads(mpath.read_text())
    m["graphs"]["embed"]["gears"] = [{"seq": 1}]  # ATC wants 2..100 gears
    mpath.write_text(json.dumps(m))
    with pytest.raises(CompileError, match="fails the ATC lint"):
        compile_bundle(bundle_copy, CompileOptions(), echo=lambda s: None)
    assert cann.calls() == []
    res = compile_bundle(bundle_copy, CompileOptions(ignore_lint=True), echo=lambda s: None)
    assert "embed" in res.built


def test_bad_options():
    with pytest.raises(Exception, match="npu-smi"):
        CompileOptions(soc="910B3")
    with pytest.raises(Exception, match="precision mode"):
        CompileOptions(precision="fp8")
    with pytest.raises(Exception, match="unknown CANN version"):
        CompileOptions(cann="3.3")


def test_atc_version_from_the_install_records(tmp_path, monkeypatch):
    monkeypatch.delenv("ASCEND_TOOLKIT_HOME", raising=False)
    latest = tmp_path / "ascend-toolkit" / "latest"
    (latest / "bin").mkdir(parents=True)
    (latest / "bin" / "atc").write_text("#!/bin/sh\n")
    assert atc_version(str(latest / "bin" / "atc")).startswith("unknown (atc sha256 ")
    (latest / "x86_64-linux").mkdir()
    (latest / "x86_64-linux" / "ascend_toolkit_install.info").write_text(
        "package_name=Ascend-cann-toolkit\nversion=7.0.0\ninnerversion=V100R001C15\n")
    assert atc_version(str(latest / "bin" / "atc")) == "7.0.0"


def test_without_onnx_the_recorded_plan_is_used(bundle_copy, cann, monkeypatch):
    """A deploy box may lack the onnx package: the lint cannot run, the export's plan stands in."""
    import importlib.util

    mpath = bundle_copy / "manifest.json"
    m = json.loads(mpath.read_text())
    m["atc"]["keep_dtype"] = {"vision": ["/ln_vision/Pow"]}
    mpath.write_text(json.dumps(m))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    out = []
    compile_bundle(bundle_copy, CompileOptions(), echo=out.append)
    assert any("lint cannot run" in line and "recorded at export" in line for line in out)
    assert (bundle_copy / "om" / "vision.keep_dtype").read_text() == "/ln_vision/Pow\n"
    assert not (bundle_copy / "om" / "decoder_0.keep_dtype").exists()


def test_compile_and_lint_need_no_torch(bundle_copy, tmp_path):
    """They run on the Ascend box, which has the runtime and CANN but no torch."""
    env = no_torch_env(tmp_path)
    for args in (["compile", bundle_copy, "--script-only"], ["lint", bundle_copy, "--no-info"]):
        r = run_cli(*args, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
