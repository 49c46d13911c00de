"""Decode benchmark: a vlm2om bundle (onnxruntime + numpy KV cache) vs transformers, same weights.

What it measures (``make bench``; it prints a figure and never fails on timings):

* The "bench" preset (a ~134M-parameter Llama decoder: 768 wide, 12 layers, vocab 32000) is
  exported to a temporary bundle, and the same seeded weights are rebuilt with ``build_modules``
  and copied into ``transformers.LlamaForCausalLM`` (eager attention, float32) through an
  explicit name map that must cover every parameter on both sides.
* Both start from the same MiniGPT-4 prompt (examples/sample.png + a fixed question, ~110
  positions). transformers gets the prompt embeddings of ``MiniGPT4Reference.context`` as
  ``inputs_embeds``; the bundle runs ``Chat.ask``. Image encoding is excluded on both sides;
  the bundle's TTFT also includes tokenizing the prompt and running the embed graph on it.
* Greedy decoding, N new tokens, no EOS stop; the greedy tokens of both must agree.
* transformers: TTFT = time of ``generate(max_new_tokens=1)``, ms/token = (T(N) - T(1)) / (N - 1).
  vlm2om: TTFT = ``chat.last.ttft_s``, ms/token = ``chat.last.ms_per_token`` (a new Chat each time).
  One warm-up, then the median of ``--repeats`` interleaved runs; same thread count for torch and onnxruntime.
  Run it on an otherwise idle machine: any other CPU load (a test run, say) skews both sides.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch

from vlm2om.exporters.families.minigpt4 import recipe as minigpt4
from vlm2om.exporters.verify.baseline import hf_llama  (the name map `vlm2om bench --baseline torch` uses)
from vlm2om.exporters.core.driver import write_bundle
from vlm2om.exporters.families.minigpt4.recipe import ExportOptions, build_modules
from vlm2om.exporters.families.minigpt4 import Reference as MiniGPT4Reference
from vlm2om.runtime import GenerationConfig, open_bundle

IMAGE = ROOT / "examples" / "sample.png"
QUESTION = "Describe this image in detail."


def hf_generate(hf, embeds: torch.Tensor, n: int) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, len(embeds), dtype=torch.long),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                          eos_token_id=None, pad_token_id=0)
    return out[0, -n:].tolist(), time.perf_counter() - t0


def bundle_ask(pipe, n: int):
    chat = pipe.chat(IMAGE)  # image encoding happens here, outside the timed ask
    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, stop_on_eos=False, stop_strings=())
    for _ in chat.ask(QUESTION, cfg):
        pass
    return chat.last


def leading_equal(a: list[int], b: list[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the exported bundle (its path is printed)")
    args = ap.parse_args()
    n, threads, reps = max(2, args.new_tokens), args.threads, max(1, args.repeats)
    t_start = time.perf_counter()
    torch.set_num_threads(threads)
    opts = ExportOptions(preset="bench")
    tmp = Path(tempfile.mkdtemp(prefix="vlm2om-bench-"))
    out = tmp / "minigpt4-bench"
    try:
        print(f"exporting the 'bench' preset to {out} ...", flush=True)
        write_bundle(minigpt4.plan(opts), out, echo=lambda s: print("  " + s.replace("\n", "\n  "), flush=True))
        mods = build_modules(opts)
        hf = hf_llama(mods)
        n_params = sum(p.numel() for p in hf.parameters())
        print(f"decoder parameters: {n_params / 1e6:.1f}M (name map covers all {len(list(hf.parameters()))} "
              f"tensors); threads: {threads}; new tokens: {n}", flush=True)

        pipe = open_bundle(out, threads=threads)
        embeds = MiniGPT4Reference(mods, pipe.bundle.manifest).context(IMAGE, [(QUESTION, None)])
        del mods

        # Warm-up + agreement check.
        hf_tokens, _ = hf_generate(hf, embeds, n)
        res = bundle_ask(pipe, n)
        agree = leading_equal(hf_tokens, res.tokens)
        print(f"prompt positions: transformers {len(embeds)}, vlm2om {res.prompt_tokens}")
        print(f"greedy agreement: {agree}/{n} leading tokens equal"
              + ("" if agree == n else f"  (first difference at {agree}: hf {hf_tokens[agree:agree + 4]} "
                                       f"vs vlm2om {res.tokens[agree:agree + 4]})"), flush=True)

        # Interleaved repeats, so drift in the machine's speed touches both sides alike.
        t1s, tns, runs = [], [], []
        for _ in range(reps):
            t1s.append(hf_generate(hf, embeds, 1)[1])
            tns.append(hf_generate(hf, embeds, n)[1])
            runs.append(bundle_ask(pipe, n))
        t1, tn = statistics.median(t1s), statistics.median(tns)
        hf_ttft, hf_ms = 1000 * t1, 1000 * (tn - t1) / (n - 1)
        ov_ttft = 1000 * statistics.median(r.ttft_s for r in runs)
        ov_ms = statistics.median(r.ms_per_token for r in runs)
        pipe.close()
    finally:
        if args.keep:
            print(f"bundle kept at {out}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{'':20s} {'TTFT ms':>10s} {'decode ms/token':>16s} {'tokens/s':>10s}")
    for name, ttft, ms in [("transformers-eager", hf_ttft, hf_ms), ("vlm2om-ort", ov_ttft, ov_ms)]:
        print(f"{name:20s} {ttft:10.1f} {ms:16.2f} {1000 / ms:10.1f}")
    ratio, ratio_ttft = ov_ms / hf_ms, ov_ttft / hf_ttft
    print(f"\nvlm2om/transformers ms/token = {ratio:.2f} (target <= 0.5): "
          + ("target met" if ratio <= 0.5 else "target NOT met"))
    print(f"vlm2om/transformers TTFT     = {ratio_ttft:.2f} (a figure; no target)")
    print(f"(median of {reps} after one warm-up; {threads} threads; whole run {time.perf_counter() - t_start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
