"""The package as pyproject.toml builds it: every package folder is listed, and a wheel built
from the repository holds only ``vlm2om/`` (with the data files the code reads) and its metadata."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

from tests.helpers import ROOT

SOURCES = ("vlm2om", "graphs", "exporters", "runtime")
DATA = ("vlm2om/exporters/ascend/cann_onnx_ops_5.0.4.txt", "vlm2om/exporters/ascend/cann_onnx_ops_8.0.0.txt",
        "vlm2om/exporters/core/tiny_corpus.txt")


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _installed_name(folder, package_dir: dict[str, str]) -> str:
    """A source folder's package name through package-dir (exporters/core -> vlm2om.exporters.core)."""
    rel = folder.relative_to(ROOT).parts
    for name, src in sorted(package_dir.items(), key=lambda kv: -len(kv[1])):
        if rel[: len(src.split("/"))] == tuple(src.split("/")):
            return ".".join([name, *rel[len(src.split("/")):]])
    raise AssertionError(f"{folder} is under no package-dir entry")


def test_every_package_folder_is_listed():
    cfg = _setuptools()
    assert set(cfg["package-dir"].values()) == set(SOURCES)
    folders = [init.parent for src in SOURCES for init in (ROOT / src).rglob("__init__.py")]
    found = {_installed_name(f, cfg["package-dir"]) for f in folders}
    listed = set(cfg["packages"])
    assert found - listed == set(), "package folders missing from [tool.setuptools] packages"
    assert listed - found == set(), "listed packages with no folder"


def test_data_files_are_package_data():
    cfg = _setuptools()
    for path in DATA:
        folder = ROOT.joinpath(*_source_parts(path, cfg["package-dir"])).parent
        assert any(folder.glob(pattern) for pattern in cfg["package-data"].get(_package_of(path), [])), path


def _package_of(path: str) -> str:
    return ".".join(path.split("/")[:-1])


def _source_parts(path: str, package_dir: dict[str, str]) -> list[str]:
    parts = path.split("/")
    for n in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:n])
        if name in package_dir:
            return [*package_dir[name].split("/"), *parts[n:]]
    raise AssertionError(path)


def _can_build_wheels() -> bool:
    """The setuptools that pyproject's [build-system] asks for (it builds wheels itself since 70.1),
    installed here: ``--no-build-isolation`` builds with what is installed, and fetches nothing."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    from importlib.metadata import version

    (req,) = [r for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
              if r.startswith("setuptools")]
    need = re.search(r">=\s*([\d.]+)", req)
    have = tuple(int(x) for x in re.findall(r"\d+", version("setuptools"))[:2])
    return need is None or have >= tuple(int(x) for x in need.group(1).split(".")[:2])


@pytest.mark.skipif(not _can_build_wheels(), reason="building the wheel needs the [build-system] setuptools installed in this environment")
def test_wheel_holds_only_the_vlm2om_namespace(tmp_path):
    """Built from a copy, so the checkout gets no build/ or egg-info; about 5 s."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for folder in SOURCES:
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                        "--no-index", "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (tmp_path / "dist").glob("vlm2om-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"vlm2om"}, sorted(tops)
    assert set(DATA) <= set(names)
    modules = {n for n in names if n.endswith(".py")}
    for src_file in (p for folder in SOURCES for p in (ROOT / folder).rglob("*.py")):
        assert "/".join(_installed_parts(src_file)) in modules, f"{src_file.relative_to(ROOT)} is not in the wheel"


def _installed_parts(path) -> list[str]:
    rel = path.relative_to(ROOT).parts
    return list(rel) if rel[0] == "vlm2om" else ["vlm2om", *rel]
