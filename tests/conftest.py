"""Shared fixtures: tiny MiniGPT-4 and LLaVA-1.5 bundles, built once per test session, and torch modules."""
from __future__ import annotations

import pytest

TINY_GROUPS = 1  # layers per group: the tiny preset's two layers become two stitched files


@pytest.fixture(scope="session")
def tiny_opts():
    from vlm2om.exporters.families.minigpt4.recipe import ExportOptions

    return ExportOptions(preset="tiny", layers_per_group=TINY_GROUPS)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_opts):
    from vlm2om.exporters.families.minigpt4 import recipe as minigpt4
    from vlm2om.exporters.core.driver import write_bundle

    out = tmp_path_factory.mktemp("bundles") / "minigpt4-tiny"
    write_bundle(minigpt4.plan(tiny_opts), out, echo=lambda s: None)
    return out


@pytest.fixture(scope="session")
def tiny_modules(tiny_opts):
    """The same seeded weights as the bundle, rebuilt independently."""
    from vlm2om.exporters.families.minigpt4.recipe import build_modules

    return build_modules(tiny_opts)


@pytest.fixture(scope="session")
def sample_image():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "examples" / "sample.png"


@pytest.fixture(scope="session")
def tiny_batch_bundle(tmp_path_factory, tiny_opts):
    """The tiny bundle exported with golden files and batch gears 1, 2, 4 (`export --golden --batch-gears`)."""
    from vlm2om.exporters.families.minigpt4 import recipe as minigpt4
    from vlm2om.exporters.core.driver import write_bundle
    from vlm2om.exporters.core.extras import ExportExtras

    out = tmp_path_factory.mktemp("bundles") / "minigpt4-tiny-batch"
    write_bundle(minigpt4.plan(tiny_opts), out, echo=lambda s: None,
                 extras=ExportExtras(golden=True, batch_gears=(1, 2, 4)))
    return out


@pytest.fixture(scope="session")
def llava_batch_bundle(tmp_path_factory):
    """The tiny LLaVA-1.5 bundle with golden files and batch gears 1, 2."""
    from vlm2om.exporters.families.llava15 import recipe as llava
    from vlm2om.exporters.core.driver import write_bundle
    from vlm2om.exporters.core.extras import ExportExtras

    out = tmp_path_factory.mktemp("bundles") / "llava15-tiny-batch"
    write_bundle(llava.plan(llava.ExportOptions(preset="tiny")), out, echo=lambda s: None,
                 extras=ExportExtras(golden=True, batch_gears=(1, 2)))
    return out
