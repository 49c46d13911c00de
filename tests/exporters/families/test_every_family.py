"""What every registered family must pass, parametrized from the family registry: its tiny
bundle lints clean for ATC, runs on the runtime, answers greedily with the tokens of the
family's own torch Reference, and every graph equals its torch module on a gear the export
did not verify. A registered family with no coverage table entry fails here."""
from __future__ import annotations

import ast
import json

import numpy as np
import pytest
import torch

from tests.helpers import ROOT
from tests.helpers.families import COVERAGE, tiny_options
from vlm2om.exporters.families import FAMILIES, get_family
from vlm2om.runtime import GenerationConfig, open_bundle

NAMES = sorted(FAMILIES)
QUESTION = "Describe this image in detail."
GREEDY = GenerationConfig(max_new_tokens=16, do_sample=False, stop_on_eos=False, stop_strings=())


def _coverage(name: str):
    if name not in COVERAGE:
        pytest.fail(f"family '{name}' is registered but has no entry in tests/helpers/families.py COVERAGE")
    return COVERAGE[name]


@pytest.fixture(params=NAMES)
def family(request):
    """(name, tiny bundle path) of one registered family."""
    return request.param, request.getfixturevalue(_coverage(request.param).bundle_fixture)


def _test_functions(path: str) -> list[str]:
    tree = ast.parse((ROOT / path).read_text())
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]


def test_every_registered_family_is_covered():
    assert set(FAMILIES) == set(COVERAGE), (
        f"registered without tests: {sorted(set(FAMILIES) - set(COVERAGE))}; "
        f"tests for unregistered families: {sorted(set(COVERAGE) - set(FAMILIES))}")
    for name, cov in COVERAGE.items():
        for path in (*cov.oracle, *cov.checkpoints, cov.prompt):
            assert (ROOT / path).is_file(), f"{name}: {path} does not exist"
            assert _test_functions(path), f"{name}: {path} has no test functions"


def test_tiny_bundle_is_the_family_and_lints_clean(family):
    from vlm2om.exporters.ascend.lint import lint_path

    name, bundle = family
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert (manifest["family"], manifest["variant"]) == (name, "tiny")
    assert "tiny" in get_family(name).PRESETS
    assert [f for f in lint_path(bundle) if f.severity != "info"] == []


def test_greedy_answer_matches_the_family_reference(family, sample_image, request):
    """The runtime (gear chunks, KV cache, spliced image) against the family's Reference
    (whole-sequence recompute with the torch modules, its own preprocessing and prompt)."""
    name, bundle = family
    modules = request.getfixturevalue(COVERAGE[name].modules_fixture)
    manifest = json.loads((bundle / "manifest.json").read_text())
    expected, margins = get_family(name).Reference(modules, manifest).greedy(sample_image, [(QUESTION, None)],
                                                                              GREEDY.max_new_tokens)
    chat = open_bundle(bundle).chat(sample_image)
    text = "".join(chat.ask(QUESTION, GREEDY))
    got = chat.last.tokens
    i = next((k for k, (a, b) in enumerate(zip(got, expected)) if a != b), None)
    assert got == expected, f"{name}: first mismatch at step {i} (reference margin {margins[i]:.2e})"
    assert text.strip() == chat.last.text


def test_every_graph_on_an_unverified_gear(family):
    """Each subgraph's ONNX through the runtime's session equals its torch module (fp32)."""
    from vlm2om.runtime.backends import open_session
    from vlm2om.runtime.bundle import Bundle

    name, path = family
    bundle = Bundle.open(path)
    plan = get_family(name).plan(tiny_options(name))  # the same seeded weights, rebuilt per graph
    assert [s.name for s in plan.subgraphs] == list(bundle.manifest["graphs"])
    for sg in plan.subgraphs:
        gear = sg.gears[len(sg.gears) // 2]  # a middle gear: neither the traced nor the smallest
        feeds = sg.make_inputs(gear, torch.Generator().manual_seed(7))
        with torch.no_grad():
            expected = sg.build()(*[feeds[d.name] for d in sg.inputs])
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = open_session("ort", bundle, sg.name).run({k: v.numpy() for k, v in feeds.items()})
        for decl, e in zip(sg.outputs, expected):
            np.testing.assert_allclose(got[decl.name], e.numpy(), rtol=1e-4, atol=1e-5,
                                       err_msg=f"{name} {sg.name}.{decl.name} at {gear}")
