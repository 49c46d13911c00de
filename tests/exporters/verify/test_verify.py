"""`vlm2om verify`: thresholds recorded at export, golden replay, the torch reference, and a
perturbed graph caught and named."""
from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from tests.helpers.bundles import copy_bundle, csv_rows, perturb
from vlm2om.exporters.cli.main import main
from vlm2om.exporters.verify.metrics import E2E_THRESHOLDS, THRESHOLDS
from vlm2om.runtime.bundle import sha256_file


def test_manifest_records_thresholds_and_golden_file(tiny_batch_bundle, tiny_bundle):
    m = json.loads((tiny_batch_bundle / "manifest.json").read_text())
    v = m["verification"]
    assert v["thresholds"] == THRESHOLDS["float32"] and v["end_to_end"] == E2E_THRESHOLDS["float32"]
    golden = v["golden"]
    assert golden["file"] in m["files"]  # hashed like every bundle file
    assert m["files"][golden["file"]]["sha256"] == sha256_file(tiny_batch_bundle / golden["file"])
    assert set(golden["graphs"]) == set(m["graphs"])
    with np.load(tiny_batch_bundle / golden["file"]) as z:
        assert z["decoder_1/0/out/logits"].shape == (2, m["model"]["llama"]["vocab_size"])  # one position per row
        assert z["decoder_1/0/in/logits_index"].shape == (2,)
    # A bundle exported without --golden still records its thresholds.
    plain = json.loads((tiny_bundle / "manifest.json").read_text())["verification"]
    assert plain["thresholds"] == THRESHOLDS["float32"] and "golden" not in plain


def test_golden_verify_passes_then_catches_a_perturbed_graph(tiny_batch_bundle, tmp_path):
    bundle = copy_bundle(tiny_batch_bundle, tmp_path)
    runner = CliRunner()
    r = runner.invoke(main, ["verify", str(bundle), "--golden", "--out", str(tmp_path / "ok")])
    assert r.exit_code == 0, r.output
    rows = csv_rows(tmp_path / "ok" / "verify_minigpt4.csv")
    assert {row["graph"] for row in rows} == {"vision", "bridge", "embed", "decoder_0", "decoder_1"}
    assert all(row["result"] == "ok" and float(row["cosine"]) >= 0.99999 for row in rows)
    report = json.loads((tmp_path / "ok" / "verify_minigpt4.json").read_text())
    assert report["passed"] is True
    (case,) = report["end_to_end"]  # the stored answer fed through prefill and decode
    assert case["passed"] and case["steps"] == case["greedy_agreement"] == 16

    perturb(bundle, "decoder_1")
    r = runner.invoke(main, ["verify", str(bundle), "--golden", "--out", str(tmp_path / "bad")])
    assert r.exit_code == 1
    assert "FAIL subgraph(s) decoder_1" in r.output and "FAIL end-to-end case 0" in r.output
    rows = csv_rows(tmp_path / "bad" / "verify_minigpt4.csv")
    failed = {row["graph"] for row in rows if row["result"] == "FAIL"}
    assert failed == {"decoder_1"}
    worst = min(float(row["cosine"]) for row in rows if row["graph"] == "decoder_1")
    assert worst < THRESHOLDS["float32"]["cosine"]
    assert json.loads((tmp_path / "bad" / "verify_minigpt4.json").read_text())["passed"] is False


def test_golden_end_to_end_case_is_the_whole_reference(tiny_batch_bundle, tiny_modules):
    """The logits export --golden stored, graph by graph as the export built each module, equal the
    reference pipeline run on all modules at once over the same prompt and answer."""
    import torch

    from vlm2om.exporters.families import get_family

    m = json.loads((tiny_batch_bundle / "manifest.json").read_text())
    (case,) = m["verification"]["golden"]["end_to_end"]
    with np.load(tiny_batch_bundle / "golden.npz") as z:
        stored = {k: z[f"{case['key']}/{k}"] for k in ("image", "prompt_before", "prompt_after", "answer", "logits")}
    ref = get_family("minigpt4").Reference(tiny_modules, m)
    from PIL import Image

    image = Image.fromarray(stored["image"])
    turns = [(case["prompt"], None)]
    assert ref.prompt_ids(turns) == [stored["prompt_before"].tolist(), stored["prompt_after"].tolist()]
    answer = stored["answer"].tolist()
    assert answer == ref.text_ids(case["answer"])[:16] and len(answer) == case["steps"] == 16
    context = ref.context(image, turns)
    with torch.no_grad():
        fed = tiny_modules.embed(torch.tensor([answer[:-1]]))[0]
    want = ref.logits(torch.cat([context, fed])).numpy()[len(context) - 1:]
    assert len(context) == case["prompt_tokens"]
    np.testing.assert_allclose(stored["logits"], want, rtol=0, atol=1e-5)


def test_altered_file_without_rehash_is_named(tiny_batch_bundle, tmp_path):
    bundle = copy_bundle(tiny_batch_bundle, tmp_path)
    name = perturb(bundle, "decoder_0", rehash=False)
    r = CliRunner().invoke(main, ["verify", str(bundle), "--golden", "--out", str(tmp_path)])
    assert r.exit_code == 1 and f"altered: {name}" in r.output


def test_verify_without_golden_file_says_how(tiny_bundle, tmp_path):
    r = CliRunner().invoke(main, ["verify", str(tiny_bundle), "--golden", "--out", str(tmp_path)])
    assert r.exit_code == 1 and "export ... --golden" in r.output and str(tiny_bundle) in r.output


def test_reference_verify_end_to_end(tiny_batch_bundle, tmp_path, sample_image):
    r = CliRunner().invoke(main, ["verify", str(tiny_batch_bundle), "--reference", "--image", str(sample_image),
                                  "--prompt", "What is it?", "--new-tokens", "8", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "verify_minigpt4.json").read_text())
    assert report["mode"] == "reference" and report["passed"]
    cases = report["end_to_end"]
    assert [c["turn"] for c in cases] == [1, 2]  # the default follow-up, in the same conversation
    for case in cases:
        assert case["greedy_agreement"] == case["steps"] == 8
        assert case["min_cosine"] >= E2E_THRESHOLDS["float32"]["logits_cosine"]
    steps = csv_rows(tmp_path / "verify_minigpt4_e2e.csv")
    assert len(steps) == 16 and all(s["token"] == s["reference_token"] for s in steps)


def test_reference_verify_catches_a_perturbed_graph(tiny_batch_bundle, tmp_path, sample_image):
    bundle = copy_bundle(tiny_batch_bundle, tmp_path)
    perturb(bundle, "decoder_0", scale=0.5)
    r = CliRunner().invoke(main, ["verify", str(bundle), "--reference", "--image", str(sample_image),
                                  "--prompt", "What is it?", "--new-tokens", "4", "--out", str(tmp_path)])
    assert r.exit_code == 1
    assert "FAIL subgraph(s) decoder_0" in r.output and "FAIL end-to-end case 0" in r.output


def test_golden_verify_on_om_files(tiny_batch_bundle, tmp_path, monkeypatch):
    """The Ascend box's check: the OM files (fake ATC, ais_bench stand-in) against the golden outputs,
    judged by the float16 thresholds since ATC compiled them with force_fp16."""
    from tests.helpers import ais_bench_standin as standin
    from tests.helpers.fake_cann import install_fake_cann
    from vlm2om.exporters.ascend.compile import CompileOptions, compile_bundle

    bundle = copy_bundle(tiny_batch_bundle, tmp_path)
    install_fake_cann(tmp_path / "Ascend", monkeypatch)
    compile_bundle(bundle, CompileOptions(), echo=lambda s: None)
    standin.install(monkeypatch)
    r = CliRunner().invoke(main, ["verify", str(bundle), "--golden", "--backend", "om", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "float16: cosine >= 0.999" in r.output and "PASS: 12 subgraph outputs" in r.output


def test_reference_verify_turns_an_exif_rotated_photo_upright_when_asked(tiny_batch_bundle, tmp_path, monkeypatch):
    """--exif-transpose gives the bundle and the reference the same upright pixels (as `vlm2om run`
    sees the photo); the default reads the file as the original loaders do, sideways."""
    from PIL import Image

    from vlm2om.runtime.pipeline import VisionChatPipeline

    photo = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 64, 3), np.uint8)).save(photo, exif=exif)
    seen = []
    chat = VisionChatPipeline.chat
    monkeypatch.setattr(VisionChatPipeline, "chat", lambda self, image=None: seen.append(image) or chat(self, image))
    for flag, size in (("--exif-transpose", (40, 64)), ("--no-exif-transpose", None)):
        r = CliRunner().invoke(main, ["verify", str(tiny_batch_bundle), "--reference", "--image", str(photo), flag,
                                      "--prompt", "What is it?", "--single-turn", "--new-tokens", "2",
                                      "--out", str(tmp_path / flag)])
        assert r.exit_code == 0, r.output
        assert (seen[-1].size == size) if size else seen[-1] == photo
