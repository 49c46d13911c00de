"""Golden inputs and outputs in the bundle, so a box without torch can check its sessions.

``export --golden`` stores, for every graph and verification gear, the feeds and the torch
module's outputs in ``golden.npz`` (listed in the manifest's ``files`` like any other file,
so opening the bundle checks its hash). ``vlm2om verify --golden`` replays them through the
chosen backend (onnxruntime, or the OM files on the Ascend box) and judges each output
against the thresholds the manifest records. This module never imports torch.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from runtime.backends import open_session
from runtime.errors import BundleError

from .verify import THRESHOLDS, Metrics, judge

GOLDEN_FILE = "golden.npz"
# ATC precision modes that keep a float32 graph in float32; any other computes in fp16.
FP32_MODES = ("must_keep_origin_dtype", "force_fp32")


class GoldenWriter:
    """Streams arrays into an npz (a zip of .npy files) one graph at a time, so an export
    still holds one graph's tensors in memory."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / GOLDEN_FILE
        self._zip = zipfile.ZipFile(self.path, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.graphs: dict[str, list[dict]] = {}

    def _put(self, key: str, array: np.ndarray) -> None:
        with self._zip.open(key + ".npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)

    def add(self, graph: str, input_names: list[str], output_names: list[str], cases: list,
            dynamic_dims: list[str]) -> None:
        """``cases``: (gear, feeds, expected outputs) as the export verified them."""
        entries = []
        for i, (gear, feeds, expected) in enumerate(cases):
            key = f"{graph}/{i}"
            for name in input_names:
                self._put(f"{key}/in/{name}", feeds[name])
            for name, array in zip(output_names, expected):
                self._put(f"{key}/out/{name}", array)
            entries.append({"key": key, "gear": {k: v for k, v in gear.items() if k in dynamic_dims}})
        self.graphs[graph] = entries

    def close(self) -> dict:
        """Finish the file; return the manifest's ``verification.golden`` entry."""
        self._zip.close()
        return {"file": GOLDEN_FILE, "graphs": self.graphs}


def thresholds_for(bundle, backend: str) -> tuple[str, dict]:
    """(compute dtype, thresholds) the bundle's manifest sets for this backend: the export
    dtype on onnxruntime; float16 on OM files that ATC compiled in an fp16 precision mode."""
    m = bundle.manifest
    v = m.get("verification") or {}
    table = v.get("thresholds_by_dtype") or THRESHOLDS
    dtype = m.get("dtype", "float32")
    if backend == "om":
        modes = {o.get("precision_mode") for o in m.get("atc", {}).get("om", {}).values()}
        if dtype == "float16" or any(p not in FP32_MODES for p in modes):
            dtype = "float16"
    if dtype not in table:
        raise BundleError(f"bundle '{bundle.root}': no verification thresholds for dtype '{dtype}'")
    return dtype, dict(table[dtype])


def thresholds_label(bundle, backend: str, overrides: dict | None = None) -> str:
    dtype, t = thresholds_for(bundle, backend)
    t.update(overrides or {})
    return f"{dtype}: cosine >= {t['cosine']}, rel_euclid <= {t['rel_euclid']}"


def golden_entry(bundle) -> dict:
    entry = (bundle.manifest.get("verification") or {}).get("golden")
    if not entry:
        raise BundleError(f"bundle '{bundle.root}' has no golden inputs and outputs: export it with "
                          "`vlm2om export ... --golden`, or verify with --reference on a box with torch")
    return entry


def verify_golden(bundle, backend: str = "ort", thresholds: dict | None = None,
                  graphs: list[str] | None = None, **backend_options) -> list[Metrics]:
    """Replay the golden feeds of every graph (or ``graphs``) through ``backend``."""
    entry = golden_entry(bundle)
    dtype, limits = thresholds_for(bundle, backend)
    limits.update(thresholds or {})
    path = bundle.path(entry["file"])
    wanted = graphs or list(entry["graphs"])
    unknown = [g for g in wanted if g not in entry["graphs"]]
    if unknown:
        raise BundleError(f"{path} has no golden cases for graph(s) {unknown} (it has {list(entry['graphs'])})")
    rows: list[Metrics] = []
    try:
        store = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot read golden file '{path}': {e}") from None
    with store:
        for graph in wanted:
            sess = open_session(backend, bundle, graph, **backend_options)
            try:
                for case in entry["graphs"][graph]:
                    feeds = {s.name: _load(store, path, graph, f"{case['key']}/in/{s.name}") for s in sess.inputs}
                    actual = sess.run(feeds)
                    for spec in sess.outputs:
                        want = _load(store, path, graph, f"{case['key']}/out/{spec.name}")
                        got = actual[spec.name]
                        rows.append(judge(graph, spec.name, case["gear"], got, want.astype(got.dtype),
                                          dtype, limits))
            finally:
                sess.close()
    return rows


def _load(store, path: Path, graph: str, key: str) -> np.ndarray:
    try:
        return store[key]
    except KeyError:
        raise BundleError(f"golden file '{path}' lacks '{key}' for graph '{graph}'") from None
