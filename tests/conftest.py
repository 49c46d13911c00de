"""Session fixtures: each family's tiny bundle (plain, and with golden files and batch gears),
exported once per test session, and the same seeded torch modules built independently."""
from __future__ import annotations

import pytest

from tests.helpers import SAMPLE_IMAGE
from tests.helpers.families import tiny_options


def _export(tmp_path_factory, family: str, folder: str, **extras):
    from vlm2om.exporters.core.driver import write_bundle
    from vlm2om.exporters.core.extras import ExportExtras
    from vlm2om.exporters.families import get_family

    out = tmp_path_factory.mktemp("bundles") / folder
    write_bundle(get_family(family).plan(tiny_options(family)), out, echo=lambda s: None,
                 **({"extras": ExportExtras(**extras)} if extras else {}))
    return out


def _modules(family: str):
    from vlm2om.exporters.families import get_family

    return get_family(family).build_modules(tiny_options(family))


@pytest.fixture(scope="session")
def sample_image():
    return SAMPLE_IMAGE


@pytest.fixture(scope="session")
def tiny_opts():
    """MiniGPT-4's tiny preset with one layer per decoder group (two stitched files)."""
    return tiny_options("minigpt4")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    return _export(tmp_path_factory, "minigpt4", "minigpt4-tiny")


@pytest.fixture(scope="session")
def tiny_modules():
    """The same seeded weights as the bundle, rebuilt independently."""
    return _modules("minigpt4")


@pytest.fixture(scope="session")
def tiny_batch_bundle(tmp_path_factory):
    """The tiny bundle exported with golden files and batch gears 1, 2, 4 (`export --golden --batch-gears`)."""
    return _export(tmp_path_factory, "minigpt4", "minigpt4-tiny-batch", golden=True, batch_gears=(1, 2, 4))


@pytest.fixture(scope="session")
def llava_bundle(tmp_path_factory):
    return _export(tmp_path_factory, "llava15", "llava15-tiny")


@pytest.fixture(scope="session")
def llava_modules():
    return _modules("llava15")


@pytest.fixture(scope="session")
def llava_batch_bundle(tmp_path_factory):
    """The tiny LLaVA-1.5 bundle with golden files and batch gears 1, 2."""
    return _export(tmp_path_factory, "llava15", "llava15-tiny-batch", golden=True, batch_gears=(1, 2))


@pytest.fixture(scope="session")
def visualglm_bundle(tmp_path_factory):
    return _export(tmp_path_factory, "visualglm", "visualglm-tiny")


@pytest.fixture(scope="session")
def visualglm_modules():
    return _modules("visualglm")


@pytest.fixture(scope="session")
def ixc2_vl_bundle(tmp_path_factory):
    return _export(tmp_path_factory, "ixc2-vl", "ixc2-vl-tiny")


@pytest.fixture(scope="session")
def ixc2_vl_modules():
    return _modules("ixc2-vl")


@pytest.fixture(scope="session")
def ixc2_4khd_bundle(tmp_path_factory):
    return _export(tmp_path_factory, "ixc2-4khd", "ixc2-4khd-tiny")


@pytest.fixture(scope="session")
def ixc2_4khd_modules():
    return _modules("ixc2-4khd")
