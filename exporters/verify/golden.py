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

from vlm2om.runtime.backends import open_session

from vlm2om.exporters.ascend.atc import KEEPS_DTYPE_ALREADY
from vlm2om.runtime.errors import BundleError

from vlm2om.exporters.verify.metrics import E2E_THRESHOLDS, THRESHOLDS, Metrics, judge
from vlm2om.exporters.verify.cases import CaseResult, judge_steps, layout_difference

GOLDEN_FILE = "golden.npz"


class GoldenWriter:
    """Streams arrays into an npz (a zip of .npy files) one graph at a time, so an export
    still holds one graph's tensors in memory."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / GOLDEN_FILE
        self._zip = zipfile.ZipFile(self.path, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.graphs: dict[str, list[dict]] = {}
        self.end_to_end: list[dict] = []
        self.end_to_end_missing = ""  # why there is no end-to-end case, when there is none

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

    def add_end_to_end(self, entry: dict, arrays: dict[str, np.ndarray]) -> None:
        """One end-to-end case (``golden_trace``): image, prompt ids, answer, reference logits."""
        key = f"e2e/{len(self.end_to_end)}"
        for name, array in arrays.items():
            self._put(f"{key}/{name}", array)
        self.end_to_end.append({"key": key, **entry})

    def close(self) -> dict:
        """Finish the file; return the manifest's ``verification.golden`` entry."""
        self._zip.close()
        entry = {"file": GOLDEN_FILE, "graphs": self.graphs, "end_to_end": self.end_to_end}
        if self.end_to_end_missing:
            entry["end_to_end_missing"] = self.end_to_end_missing
        return entry


def thresholds_for(bundle, backend: str) -> tuple[str, dict]:
    """(compute dtype, thresholds) the bundle's manifest sets for this backend: the export
    dtype on onnxruntime; float16 on OM files that ATC compiled in an fp16 precision mode."""
    m = bundle.manifest
    v = m.get("verification") or {}
    table = v.get("thresholds_by_dtype") or THRESHOLDS
    dtype = m.get("dtype", "float32")
    if backend == "om":
        modes = {o.get("precision_mode") for o in m.get("atc", {}).get("om", {}).values()}
        if dtype == "float16" or any(p not in KEEPS_DTYPE_ALREADY for p in modes):
            dtype = "float16"
    if dtype not in table:
        raise BundleError(f"bundle '{bundle.root}': no verification thresholds for dtype '{dtype}'")
    return dtype, dict(table[dtype])


def e2e_limits(bundle, backend: str) -> dict:
    """End-to-end thresholds: the manifest's for its own dtype, the float16 ones on OM files
    that ATC compiled in an fp16 precision mode."""
    dtype = thresholds_for(bundle, backend)[0]
    v = bundle.manifest.get("verification") or {}
    return dict(v["end_to_end"]) if v.get("end_to_end") and v.get("dtype") == dtype else dict(E2E_THRESHOLDS[dtype])


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


def verify_golden_e2e(bundle, backend: str = "ort", **backend_options) -> list[CaseResult]:
    """Each stored end-to-end case through the bundle as a user runs it: the runtime's
    preprocessing, prompt and tokenizer, the image graphs, prefill and KV-cache decode fed the
    stored answer (``Chat.score``), against the reference logits the export recorded."""
    from PIL import Image

    from vlm2om.runtime.pipeline import open_pipeline

    entry = golden_entry(bundle)
    if not entry.get("end_to_end"):
        return []
    path, limits = bundle.path(entry["file"]), e2e_limits(bundle, backend)
    pipe = open_pipeline(bundle, backend, **backend_options)
    results = []
    try:
        with np.load(path, allow_pickle=False) as store:
            for i, case in enumerate(entry["end_to_end"]):
                def get(name, key=case["key"]):
                    return _load(store, path, "end-to-end", f"{key}/{name}")

                answer = get("answer").tolist()
                chat = pipe.chat(Image.fromarray(get("image")))
                layout, ours = chat.score(case["prompt"], answer)
                res = CaseResult(i, "golden image", case["prompt"], 1, layout.length)
                results.append(res)
                res.reason = layout_difference(layout.segments, [get("prompt_before").tolist(),
                                                                 get("prompt_after").tolist()])
                if not res.reason:
                    judge_steps(res, answer, ours, get("logits"), limits, forced=True)
    finally:
        pipe.close()
    return results
