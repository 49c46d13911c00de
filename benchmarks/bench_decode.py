"""Decode and prefill benchmark: a vlm2om bundle vs onnxruntime-genai fp32 vs transformers eager,
on the same weights and the same prompts (``make bench``; it prints figures, never fails on them).

What it measures and how:

* Weights: the MiniGPT-4 "bench" preset (a ~134M-parameter Llama decoder: 768 wide, 12 layers,
  vocab 32000; seeded random weights), float32. The bundle is exported with ``write_bundle`` in
  the preset's layout for onnxruntime (per-layer KV, seq gears up to 512, a cache gear every 256
  slots up to 2304, so a 2000-token prompt plus the new tokens fits), or taken from ``--bundle DIR``. The same weights are rebuilt from the bundle's provenance with
  ``build_modules``, copied into transformers' ``LlamaForCausalLM`` (eager attention) by
  ``hf_llama`` and saved as a Hugging Face folder (safetensors); ``max_position_embeddings`` is
  raised to cover the longest prompt (default RoPE does not depend on it). onnxruntime-genai's own
  model builder makes its fp32 CPU model from that folder. The builder insists on a tokenizer it
  can load: the folder carries the preset's SentencePiece model as a ``LlamaTokenizer``; no system
  tokenizes anything, every one gets the same token ids.
* Prompts: text only, the first 128, 512, 1024 and 2000 ids (``--contexts``) of one seeded random
  sequence in [3, vocab); then 64 greedy new tokens (``--new-tokens``), no EOS stop: transformers
  with no EOS id (plain argmax), the bundle with ``stop_on_eos=False``, genai with min_length
  (which masks EOS until then; a note is printed should transformers' tokens hold EOS).
* transformers: ``generate(input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
  eos_token_id=None)``; TTFT = T(1 new token), ms/token = (T(n) - T(1)) / (n - 1).
  onnxruntime-genai: a Generator (greedy, max_length = min_length = prompt + n); TTFT =
  ``append_tokens`` + the first ``generate_next_token`` (creating the Generator, which allocates
  its cache, is timed apart and printed), ms/token = the other n - 1 calls / (n - 1).
  bundle: ``open_bundle(dir, threads=T, spin=True)`` (the shared spinning pool, ``--spin``: this
  is a quiet-machine benchmark, and onnxruntime-genai's pools spin too); TTFT = ``decoder.embed(ids)`` + ``BatchResult.ttft_s``
  (prefill and the first token) of ``BatchGenerator.generate``; ms/token = ``ms_per_step``.
* A short context in a large cache gear: a second bundle with the same options and two cache
  gears, the largest one and one below the shortest prompt (half its length), so that prompt is
  prefilled and decoded in the largest gear; timed on the shortest prompt beside the others
  (``--no-large-gear`` skips it; with ``--bundle`` it is exported by the current code from that
  bundle's recorded options). Two gears, not one: a bundle with a single cache gear has no
  ``cache`` dim in its gear list, which the runtime's gear selection needs.
* Each system runs in its own process (its own thread pool, so nothing spins against the system
  being timed; the others wait on a pipe), with the same thread count (``--threads``, default:
  the machine's cores): torch.set_num_threads, open_bundle(threads=, spin=True), and for onnxruntime-genai
  ``intra_op_num_threads`` in genai_config.json's decoder session_options.
* Per context: one warm-up run of each system, then ``--repeats`` interleaved rounds
  (A B C A B C ...); the figures are medians. The 1-minute load average is printed before and
  after; greedy tokens are compared with transformers' (leading equal tokens, the worst run).
  The last line is the worst bundle/genai decode ratio over the contexts.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

BUNDLE, LARGE, GENAI, TORCH = "vlm2om bundle", "bundle, large gear", "onnxruntime-genai fp32", "transformers eager"


# ---- the systems, each in a process of its own -------------------------------------------------

class BundleSystem:
    def __init__(self, folder: str, threads: int):
        import vlm2om
        from vlm2om.runtime.batch import BatchGenerator

        self.pipe = vlm2om.open_bundle(folder, threads=threads, spin=True)
        self.gen = BatchGenerator(self.pipe)

    def run(self, ids: list[int], n: int) -> dict:
        from vlm2om import GenerationConfig

        cfg = GenerationConfig(max_new_tokens=n, do_sample=False, stop_on_eos=False, stop_strings=())
        t0 = time.perf_counter()
        embeds = self.pipe.decoder.embed(ids)
        embed_s = time.perf_counter() - t0
        res = self.gen.generate([embeds], cfg)
        return {"ttft_ms": 1000 * (embed_s + res.ttft_s), "ms": res.ms_per_step, "tokens": res.sequences[0].tokens}


class GenaiSystem:
    def __init__(self, folder: str, threads: int):
        import onnxruntime_genai as og

        self.og, self.model = og, og.Model(folder)

    def run(self, ids: list[int], n: int) -> dict:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(ids) + n, min_length=len(ids) + n)
        t0 = time.perf_counter()
        gen = self.og.Generator(self.model, params)
        t1 = time.perf_counter()
        gen.append_tokens(np.asarray(ids, np.int32))
        gen.generate_next_token()
        t2 = time.perf_counter()
        for _ in range(n - 1):
            gen.generate_next_token()
        t3 = time.perf_counter()
        tokens = [int(t) for t in gen.get_sequence(0)[len(ids):]]
        return {"ttft_ms": 1000 * (t2 - t1), "ms": 1000 * (t3 - t2) / (n - 1), "tokens": tokens,
                "generator_ms": 1000 * (t1 - t0)}


class TorchSystem:
    def __init__(self, folder: str, threads: int):
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        torch.set_num_threads(threads)
        self.torch = torch
        self.hf = transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                                dtype=torch.float32).eval()

    def _generate(self, ids, n: int) -> tuple[list[int], float]:
        t0 = time.perf_counter()
        with self.torch.no_grad():
            out = self.hf.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[0, ids.shape[1]:].tolist(), time.perf_counter() - t0

    def run(self, ids: list[int], n: int) -> dict:
        x = self.torch.tensor([ids], dtype=self.torch.long)
        t1 = self._generate(x, 1)[1]
        tokens, tn = self._generate(x, n)
        return {"ttft_ms": 1000 * t1, "ms": 1000 * (tn - t1) / (n - 1), "tokens": tokens}


SYSTEMS = {"bundle": BundleSystem, "genai": GenaiSystem, "torch": TorchSystem}


def _serve(kind: str, folder: str, threads: int, conn) -> None:
    """A worker: load the system, then run each (ids, n) it is sent until it gets None."""
    import traceback

    try:
        system = SYSTEMS[kind](folder, threads)
        conn.send(("ready", None))
        while (job := conn.recv()) is not None:
            conn.send(("ok", system.run(*job)))
    except Exception:  # reported by the parent, which stops the benchmark
        conn.send(("error", traceback.format_exc()))


class Worker:
    def __init__(self, ctx, name: str, kind: str, folder: Path, threads: int):
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(kind, str(folder), threads, child), daemon=True)
        self.proc.start()

    def answer(self):
        """The worker's next answer (the first says the system is loaded)."""
        status, value = self.conn.recv()
        if status == "error":
            raise SystemExit(f"{self.name} failed:\n{value}")
        return value

    def run(self, ids: list[int], n: int) -> dict:
        self.conn.send((ids, n))
        return self.answer()

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(10)


# ---- setup: bundles, the Hugging Face folder, onnxruntime-genai's model ----------------------------

def export(opts, out: Path, label: str) -> None:
    from vlm2om.exporters.core.driver import write_bundle
    from vlm2om.exporters.families import get_family

    print(f"exporting {label} to {out} ...", flush=True)
    t0 = time.perf_counter()
    write_bundle(get_family("minigpt4").plan(opts), out,
                 echo=lambda s: print("  " + s.replace("\n", "\n  "), flush=True))
    print(f"  ({time.perf_counter() - t0:.0f}s)", flush=True)


def hf_folder(source, out: Path, positions: int) -> int:
    """Save the bundle's weights as a LlamaForCausalLM folder the genai builder reads; the vocab size."""
    import transformers

    from vlm2om.exporters.verify.baseline import hf_llama

    transformers.logging.disable_progress_bar()
    mods = source.recipe.build_modules(source.options)
    hf = hf_llama(mods)
    hf.config.max_position_embeddings = max(hf.config.max_position_embeddings, positions)
    hf.save_pretrained(out, safe_serialization=True)
    (out / "tokenizer.model").write_bytes(mods.tokenizer)
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"transformers LlamaForCausalLM: {n_params / 1e6:.1f}M parameters (name map covers all "
          f"{len(list(hf.parameters()))} tensors), saved to {out}", flush=True)
    return mods.llama.vocab_size


def genai_model(hf: Path, out: Path, threads: int) -> None:
    print(f"onnxruntime-genai model builder: fp32, cpu -> {out} ...", flush=True)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
           "-p", "fp32", "-e", "cpu", "-c", str(out.parent / "genai-cache")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"the onnxruntime-genai builder failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    path = out / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    path.write_text(json.dumps(config, indent=4))
    print(f"  ({time.perf_counter() - t0:.0f}s; genai_config.json: decoder session_options "
          f"intra_op_num_threads = {threads}, context_length {config['model']['context_length']})", flush=True)


# ---- measuring and reporting ------------------------------------------------------------------

def leading_equal(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def measure(workers: list[Worker], contexts: list[int], prompt: list[int], n: int, reps: int) -> dict:
    """results[context][system] = every timed run; one warm-up each, then interleaved rounds."""
    results: dict[int, dict[str, list[dict]]] = {}
    for c in contexts:
        here = [w for w in workers if w.name != LARGE or c == contexts[0]]
        ids = prompt[:c]
        t0 = time.perf_counter()
        for w in here:
            w.run(ids, n)
        print(f"context {c}: warmed up in {time.perf_counter() - t0:.0f}s (load {load()})", flush=True)
        runs = results[c] = {w.name: [] for w in here}
        for r in range(reps):
            for w in here:
                runs[w.name].append(w.run(ids, n))
            print(f"  run {r + 1}/{reps}: " + "; ".join(
                f"{k} {v[-1]['ttft_ms']:.0f} ms + {v[-1]['ms']:.2f} ms/token" for k, v in runs.items()), flush=True)
    return results


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report(results: dict, n: int, large_gear: int | None) -> float:
    worst = 0.0
    for c, runs in results.items():
        ref = runs[TORCH][0]["tokens"]
        print(f"\ncontext {c} tokens + {n} new (median of {len(runs[TORCH])} runs)")
        print(f"  {'system':26s} {'TTFT ms':>9s} {'decode ms/token':>16s} {'(min..max)':>14s} "
              f"{'tokens = transformers':>22s}")
        for name, rs in runs.items():
            agree = min(leading_equal(r["tokens"], ref) for r in rs)
            ms = [r["ms"] for r in rs]
            label = f"{name} ({large_gear})" if name == LARGE else name
            print(f"  {label:26s} {med(rs, 'ttft_ms'):9.1f} {med(rs, 'ms'):16.2f} "
                  f"{f'{min(ms):.2f}..{max(ms):.2f}':>14s} {f'{agree}/{n}':>22s}")
        b, g, t = runs[BUNDLE], runs[GENAI], runs[TORCH]
        ratio = med(b, "ms") / med(g, "ms")
        worst = max(worst, ratio)
        print(f"  bundle/genai: TTFT {med(b, 'ttft_ms') / med(g, 'ttft_ms'):.2f}, decode {ratio:.2f};  "
              f"bundle/transformers: TTFT {med(b, 'ttft_ms') / med(t, 'ttft_ms'):.2f}, "
              f"decode {med(b, 'ms') / med(t, 'ms'):.2f}")
        print(f"  (onnxruntime-genai's Generator(), before append_tokens and not in its TTFT: "
              f"{med(g, 'generator_ms'):.1f} ms)")
        if 2 in ref:
            print(f"  note: transformers' greedy tokens hold EOS (2) at {ref.index(2)}; genai's min_length "
                  "suppresses EOS there, the others do not")
    lo, hi = min(results), max(results)
    if lo != hi:
        print(f"\ndecode-step growth from {lo} to {hi} tokens of context (ms/token at {hi} / at {lo}):")
        for name in (BUNDLE, GENAI, TORCH):
            print(f"  {name:26s} {med(results[hi][name], 'ms') / med(results[lo][name], 'ms'):.2f}x")
    if LARGE in results[lo]:
        a, b = med(results[lo][LARGE], "ms"), med(results[lo][BUNDLE], "ms")
        print(f"\nshort context in a large gear: {lo} tokens cost {a:.2f} ms/token in the {large_gear} gear, "
              f"{b:.2f} in the gear the bundle picks ({a / b:.2f}x)")
    return worst


@dataclass
class Setup:
    """The folders every system loads, and what the report needs to know about them."""

    bundle: Path
    genai: Path
    hf: Path
    large: Path | None  # the bundle whose shortest-prompt runs sit in the largest gear
    large_gear: int
    vocab: int


def prepare(args, tmp: Path, need: int, shortest: int, threads: int) -> Setup:
    """Export (or take) the bundle, and make the transformers and onnxruntime-genai folders from
    the weights its provenance names."""
    from vlm2om.exporters.families import get_family
    from vlm2om.exporters.verify.against_torch import reference_source
    from vlm2om.runtime import Bundle

    folder = args.bundle
    if folder is None:
        folder = tmp / "bundle"
        opts = get_family("minigpt4").ExportOptions(preset="bench", dtype="float32")  # the preset's gears
        export(opts, folder, "the 'bench' preset")
    bundle = Bundle.open(folder)
    source = reference_source(bundle)
    gears = list(bundle.manifest["kv_cache"]["capacity_gears"])
    seq = sorted({g["seq"] for g in bundle.graph(bundle.manifest["pipeline"]["decoder_graphs"][0])["gears"]})
    print(f"bundle {folder}: {bundle.manifest.get('dtype', '?')}, {source.label}, cache gears {gears}, "
          f"seq gears {seq}", flush=True)
    if need > max(gears):
        raise SystemExit(f"{need} positions exceed the bundle's largest cache gear {max(gears)}")
    large = None
    if args.no_large_gear or len(gears) == 1:
        print("short context in a large gear: skipped" + (" (--no-large-gear)" if args.no_large_gear else
                                                            " (the bundle has one cache gear)"))
    else:
        large, small = tmp / "bundle-large-gear", max(1, shortest // 2)  # the shortest prompt cannot fit `small`
        export(replace(source.options, cache_gears=(small, max(gears))), large,
               f"the same options with cache gears ({small}, {max(gears)})")
    vocab = hf_folder(source, tmp / "hf", need)
    genai_model(tmp / "hf", tmp / "genai", threads)
    return Setup(folder, tmp / "genai", tmp / "hf", large, max(gears), vocab)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="128,512,1024,2000", help="prompt lengths, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--bundle", type=Path, help="time this exported bundle instead of exporting one")
    ap.add_argument("--no-large-gear", action="store_true", help="skip the short-context-in-a-large-gear bundle")
    ap.add_argument("--keep", action="store_true", help="keep the folders (their path is printed)")
    args = ap.parse_args()
    contexts = sorted({int(c) for c in args.contexts.split(",")})
    n, threads, reps = max(2, args.new_tokens), max(1, args.threads), max(1, args.repeats)
    t_start = time.perf_counter()
    print(f"1-minute load average at start: {load()}; threads {threads}; contexts {contexts}; "
          f"{n} new tokens; {reps} runs after one warm-up", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="vlm2om-bench-"))
    workers: list[Worker] = []
    try:
        setup = prepare(args, tmp, contexts[-1] + n, contexts[0], threads)
        prompt = np.random.default_rng(0).integers(3, setup.vocab, contexts[-1]).tolist()
        ctx = mp.get_context("spawn")
        plan = [(BUNDLE, "bundle", setup.bundle), (GENAI, "genai", setup.genai), (TORCH, "torch", setup.hf)]
        if setup.large:
            plan.append((LARGE, "bundle", setup.large))
        workers = [Worker(ctx, name, kind, folder, threads) for name, kind, folder in plan]
        for w in workers:
            w.answer()
        print(f"systems loaded, one process each; setup took {time.perf_counter() - t_start:.0f}s", flush=True)
        print(f"1-minute load average before timing: {load()}", flush=True)
        results = measure(workers, contexts, prompt, n, reps)
        print(f"1-minute load average after timing: {load()}", flush=True)
    finally:
        for w in workers:
            w.close()
        if args.keep:
            print(f"folders kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    worst = report(results, n, setup.large_gear if setup.large else None)
    print(f"\n({threads} threads; whole run {time.perf_counter() - t_start:.0f}s)")
    print(f"worst decode ratio vs onnxruntime-genai: {worst:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
