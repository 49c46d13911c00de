"""One decode step of a bundle's first decoder graph, as onnxruntime runs it: the node count of
its optimized graph, the time per op type (onnxruntime's profiler), and the median step time of
several bundles run interleaved (so that they share the machine's state).

    python benchmarks/profile_step.py BUNDLE [BUNDLE ...] [--cache 256] [--steps 150] [--threads 2]

Feeds one new token at the given cache gear, every cache slot valid, random values. It reads
the graph straight from the bundle (no runtime), so it isolates the graph from the host loop.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def session(bundle: Path, threads: int, profile_dir: str | None = None):
    m = json.loads((bundle / "manifest.json").read_text())
    g = m["graphs"][m["pipeline"]["decoder_graphs"][0]]
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_dir:
        so.enable_profiling, so.profile_file_prefix = True, os.path.join(profile_dir, "step")
        so.optimized_model_filepath = os.path.join(profile_dir, "optimized.onnx")
    return ort.InferenceSession(str(bundle / g["file"]), so, providers=["CPUExecutionProvider"]), g


def feeds(g: dict, cache: int) -> dict:
    rng, out = np.random.default_rng(0), {}
    for spec in g["inputs"]:
        shape = [{"seq": 1, "cache": cache, "batch": 1}.get(d, d) if isinstance(d, str) else d for d in spec["shape"]]
        out[spec["name"]] = (np.full(shape, cache - 1, np.int64) if spec["dtype"] == "int64"
                             else rng.standard_normal(shape).astype(spec["dtype"]))
        if spec.get("role") in ("valid_mask", "logits_index"):
            out[spec["name"]] = np.ones(shape, spec["dtype"]) if spec["role"] == "valid_mask" else np.zeros(shape, np.int64)
    return out


def profile(bundle: Path, cache: int, threads: int, runs: int = 20) -> None:
    with tempfile.TemporaryDirectory() as d:
        s, g = session(bundle, threads, d)
        f = feeds(g, cache)
        for _ in range(runs):
            s.run(None, f)
        events = [e for e in json.load(open(s.end_profiling()))
                  if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
        nodes = len(onnx.load(os.path.join(d, "optimized.onnx"), load_external_data=False).graph.node)
    last = events[-len(events) // runs * (runs // 2):]  # the second half of the runs
    per_op, count = collections.Counter(), collections.Counter()
    for e in last:
        per_op[e["args"]["op_name"]] += e["dur"]
        count[e["args"]["op_name"]] += 1
    k = runs // 2
    print(f"{bundle}: {nodes} nodes in onnxruntime's optimized graph; per step (profiled, us):")
    for op, us in per_op.most_common(12):
        print(f"  {op:32s} {count[op] // k:4d} nodes {us / k:9.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--cache", type=int, default=256, help="the cache gear fed")
    ap.add_argument("--steps", type=int, default=150, help="interleaved steps per bundle")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    for b in args.bundles:
        profile(b, args.cache, args.threads)
    pairs = [(b, *session(b, args.threads)) for b in args.bundles]
    runs = [(b, s, feeds(g, args.cache)) for b, s, g in pairs]
    times = {b: [] for b, _, _ in runs}
    for b, s, f in runs:
        s.run(None, f)  # warm-up
    for _ in range(args.steps):
        for b, s, f in runs:
            t = time.perf_counter()
            s.run(None, f)
            times[b].append(time.perf_counter() - t)
    print(f"one step at cache {args.cache}, {args.threads} threads, no spinning, {args.steps} interleaved runs:")
    for b, t in times.items():
        print(f"  {str(b):40s} median {1e3 * np.median(t):7.2f} ms  min {1e3 * np.min(t):7.2f}")


if __name__ == "__main__":
    main()
