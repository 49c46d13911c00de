"""Export and run options a user can get wrong: each is refused in one line naming the option and
the value, with a previous bundle at ``--out`` byte-identical and nothing left beside it; the
export's are refused before torch is imported (a fresh process proves it), so a typo costs a
fraction of a second, not torch's import."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from tests.helpers.faults import Outcome, expect_error, invoke

ELEVEN_SEQ = ",".join(map(str, range(1, 12)))
ELEVEN_CACHE = ",".join(map(str, range(100, 201, 10)))
FIFTY_ONE_CACHE = ",".join(map(str, range(100, 601, 10)))

# (options after `export minigpt4 --out OUT`, what the message says, exit status); none needs torch.
TORCH_FREE = {
    "opt-without-value": (["--opt", "vision_graphs"], ["--opt vision_graphs: expected NAME=VALUE"], 2),
    "gears-not-ints": (["--seq-gears", "1,a"],
                       ["Invalid value for '--seq-gears': expected comma-separated integers, got '1,a'"], 2),
    "gears-empty": (["--cache-gears", ""], ["'--cache-gears'", "leave the option out for the default"], 2),
    "gear-zero": (["--cache-gears", "0,128"], ["--cache-gears 0,128: every gear must be at least 1, got 0"], 1),
    "gear-negative": (["--seq-gears", "1,-16"], ["--seq-gears 1,-16: every gear must be at least 1, got -16"], 1),
    "seq-without-1": (["--seq-gears", "16,64"], ["--seq-gears 16,64: must include 1"], 1),
    "batch-without-1": (["--batch-gears", "2,4"], ["--batch-gears 2,4: must include 1"], 1),
    "too-many-gears": (["--seq-gears", ELEVEN_SEQ, "--cache-gears", ELEVEN_CACHE],
                       ["--seq-gears (11) x --cache-gears (11) = 121 gears for each decoder graph; "
                        "ATC compiles at most 100 gears per graph"], 1),
    "too-many-with-batch": (["--seq-gears", "1,16", "--cache-gears", ELEVEN_CACHE, "--batch-gears", "1,2,3,4,5"],
                            ["--seq-gears (2) x --cache-gears (11) x --batch-gears (5) = 110 gears"], 1),
    "bad-kv-layout": (["--kv-layout", "ragged"], ["'--kv-layout'", "'ragged' is not one of 'stacked', 'per_layer'"],
                      2),
    "bad-dtype": (["--dtype", "int8"], ["'--dtype'", "'int8' is not one of"], 2),
    "layers-per-group-zero": (["--layers-per-group", "0"], ["'--layers-per-group'", "0 is not in the range"], 2),
    "checkpoint-and-preset": (["--checkpoint", str(ROOT), "--preset", "tiny"],
                              ["give either --checkpoint or --preset, not both"], 2),
    "missing-checkpoint": (["--checkpoint", "/nonexistent/llava"], ["--checkpoint '/nonexistent/llava' does not exist"],
                           1),
}
# MODEL's own options: refused before torch once the family's options module imports none.
OWN = {
    "unknown-option": (["--bogus"], ["No such option '--bogus'"], 2),
    "unknown-family-option": (["--opt", "bogus=1"], ["--opt bogus=1: minigpt4's own options are vision_graphs=INT"],
                              2),
    "family-option-not-int": (["--opt", "vision_graphs=two"], ["--opt vision_graphs=two: 'two' is not a valid integer"],
                              2),
    "family-option-out-of-range": (["--vision-graphs", "0"], ["--vision-graphs 0: must be >= 1"], 1),
}
# Only the preset tells these (after the family's recipe, and torch, is imported), still before any graph.
AFTER_PRESET = {
    "too-many-with-the-preset": (["--cache-gears", FIFTY_ONE_CACHE],
                                 ["the tiny preset's seq gears (3) x --cache-gears (51) = 153 gears"], 1),
    "too-many-batches-for-embed": (["--batch-gears", ",".join(map(str, range(1, 41)))],
                                   ["its seq x cache gears (3) x --batch-gears (40) = 120 gears for graph 'embed'"], 1),
    "unknown-preset": (["--preset", "huge"], ["unknown preset 'huge' (available: tiny, bench)"], 1),
}


@pytest.mark.parametrize("case", [*TORCH_FREE, *OWN, *AFTER_PRESET])
def test_export_option_is_refused_by_name(old, case, monkeypatch):
    args, needles, code = {**TORCH_FREE, **OWN, **AFTER_PRESET}[case]
    monkeypatch.setattr("vlm2om.exporters.core.driver.export_onnx", _no_graph_export)
    r = invoke("export", "minigpt4", "--out", old, *args)
    out = expect_error(r, *needles, code=code)
    assert len(r.error_lines) == 1, out


def _no_graph_export(*args, **kw):
    raise AssertionError("a graph was exported before the options were refused")


def test_unknown_model_lists_the_models(tmp_path):
    expect_error(invoke("export", "gpt5", "--out", tmp_path / "x"),
                 "unknown model 'gpt5' (available: minigpt4, llava15, visualglm, ixc2-vl, ixc2-4khd)", code=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,needle", [
    (["--threads", "-1"], "Invalid value for '--threads': -1 is not in the range x>=0"),
    (["--device-id", "-1"], "Invalid value for '--device-id': -1 is not in the range x>=0"),
    (["--backend", "gpu"], "'gpu' is not one of 'auto', 'ort', 'om'"),
], ids=["threads", "device-id", "backend"])
def test_run_option_is_refused_before_the_bundle_opens(tiny_bundle, sample_image, args, needle, monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("the bundle was opened before the options were checked")
    monkeypatch.setattr("vlm2om.runtime.bundle.Bundle.open", refuse)
    expect_error(invoke("run", tiny_bundle, "--image", sample_image, "--prompt", "Hi", *args), needle, code=2)


# --- without torch: a fresh process that reports whether torch was imported ----------------------

PROBE = r'''
import json, sys
from click.testing import CliRunner
from vlm2om.exporters.cli.main import main
seen = []
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(main, args)
    exc = None if r.exception is None or isinstance(r.exception, SystemExit) else repr(r.exception)
    seen.append({"code": r.exit_code, "output": r.output, "exception": exc, "torch": "torch" in sys.modules})
print(json.dumps(seen))
'''


def _fresh(cases: list[list[str]]) -> list[tuple[Outcome, bool]]:
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cases)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return [(Outcome(s["code"], s["output"], RuntimeError(s["exception"]) if s["exception"] else None), s["torch"])
            for s in json.loads(r.stdout)]


def _options_module_needs_torch() -> bool:
    probe = "import sys, vlm2om.exporters.families.minigpt4.options; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return r.stdout.strip() != "False"


def test_shared_option_errors_come_before_torch_is_imported(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text("{not json")
    extra = {"unreadable-config": (["--checkpoint", str(tmp_path / "ck")],
                                   [f"{tmp_path / 'ck' / 'config.json'}: cannot read config"], 1),
             "out-inside-a-file": ([], ["is a file, not a folder"], 1)}
    (tmp_path / "a-file").write_text("")
    cases = {**TORCH_FREE, **extra}
    argv = [["export", "minigpt4", "--out", str(tmp_path / ("a-file/b" if name == "out-inside-a-file" else "out")),
             *args] for name, (args, _, _) in cases.items()]
    for (name, (_, needles, code)), (outcome, torch_imported) in zip(cases.items(), _fresh(argv)):
        expect_error(outcome, *needles, code=code)
        assert not torch_imported, f"{name}: torch was imported before the error"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "ck"]


def test_own_option_errors_come_before_torch_is_imported(tmp_path):
    if _options_module_needs_torch():
        pytest.skip("exporters/families/minigpt4/options.py (or its package __init__) imports torch, so MODEL's "
                    "own options cannot be parsed without it yet")
    argv = [["export", "minigpt4", "--out", str(tmp_path / "out"), *args] for args, _, _ in OWN.values()]
    for (name, (_, needles, code)), (outcome, torch_imported) in zip(OWN.items(), _fresh(argv)):
        expect_error(outcome, *needles, code=code)
        assert not torch_imported, f"{name}: torch was imported before the error"
