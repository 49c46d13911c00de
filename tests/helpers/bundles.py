"""Copying and damaging bundles: what verify and the runtime must notice."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np


def copy_bundle(src: Path, tmp_path: Path, name: str = "bundle") -> Path:
    """A private copy of a session bundle, for a test that changes it."""
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def perturb(bundle: Path, graph: str, scale: float = 0.05, rehash: bool = True) -> str:
    """Add noise to the graph's largest weight (a wrong or damaged ONNX); optionally re-hash it in
    the manifest, as a bundle whose graph was rebuilt wrongly would be."""
    import onnx
    from onnx import numpy_helper

    from vlm2om.runtime.bundle import sha256_file

    m = json.loads((bundle / "manifest.json").read_text())
    name = m["graphs"][graph]["file"]
    model = onnx.load(str(bundle / name))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    w = numpy_helper.to_array(init)
    noisy = w + scale * np.random.default_rng(0).standard_normal(w.shape).astype(w.dtype) * np.abs(w).mean()
    init.CopyFrom(numpy_helper.from_array(noisy.astype(w.dtype), init.name))
    onnx.save(model, str(bundle / name))
    if rehash:
        p = bundle / name
        m["files"][name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        (bundle / "manifest.json").write_text(json.dumps(m, indent=1))
    return name


def csv_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def as_version_1(m: dict) -> dict:
    """What a bundle's manifest was in schema 1 (no task, no roles, a FastChat style), in place."""
    m["schema_version"] = 1
    del m["task"]
    for key in ("attention", "image_input", "image_output"):
        del m["pipeline"][key]
    for g in m["graphs"].values():
        for spec in [*g["inputs"], *g["outputs"]]:
            spec.pop("role", None)
    m["prompt"]["style"] = m["prompt"].pop("kind").removeprefix("fastchat_")
    return m
