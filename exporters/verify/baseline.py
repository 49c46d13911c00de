"""`vlm2om bench --baseline torch`: transformers' LlamaForCausalLM (eager) with the bundle's
own weights, timed on the very same prompts, so every figure has a ratio beside it.

The weights are rebuilt from the bundle's provenance (preset and seed, or the checkpoint)
and copied into transformers through an explicit name map that must cover every parameter
on both sides. Prompts are the bundle's embeddings (``inputs_embeds``), so the greedy tokens
of the two can be compared; image encoding is timed with the torch vision modules.
Definitions as the seeds': FirstTokenTime = generate(1 token); TimePerTokens = (T(N) - T(1)) / (N - 1).
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vlm2om.runtime.bench import BenchCase, BenchRow, PeakMemory
from vlm2om.runtime.errors import InputError

from vlm2om.exporters.verify.bench_table import BaselineRow
from vlm2om.exporters.verify.against_torch import reference_source

LEAVES = ["input_layernorm.weight", "post_attention_layernorm.weight",
          *(f"self_attn.{p}_proj.weight" for p in "qkvo"), *(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down"))]


def hf_llama(mods, dtype: torch.dtype = torch.float32):
    """LlamaForCausalLM carrying our weights; every parameter on both sides is mapped exactly once."""
    try:
        import transformers as T
    except ImportError as e:
        raise InputError(f"bench --baseline torch runs transformers' LlamaForCausalLM ({e}): "
                         "pip install 'vlm2om[reference]'") from None

    c = mods.llama
    hf = T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden, num_hidden_layers=c.layers, num_attention_heads=c.heads,
        num_key_value_heads=c.kv_heads, intermediate_size=c.ffn, rms_norm_eps=c.rms_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        max_position_embeddings=c.max_positions, tie_word_embeddings=False, attn_implementation="eager",
        dtype=torch.float32)).float().eval()
    pairs = [(mods.embed.embed_tokens.weight, "model.embed_tokens.weight")]
    for g in mods.groups:
        for j, layer in enumerate(g.layers):
            own = dict(layer.named_parameters())
            if set(own) != set(LEAVES):
                raise RuntimeError(f"layer {g.start + j} is not a Llama layer: {sorted(own)}")
            pairs += [(own[leaf], f"model.layers.{g.start + j}.{leaf}") for leaf in LEAVES]
        if g.is_last:
            pairs += [(g.norm.weight, "model.norm.weight"), (g.lm_head.weight, "lm_head.weight")]
    ours = [p for m in [mods.embed, *mods.groups] for p in m.parameters()]
    dst = dict(hf.named_parameters())
    names = [h for _, h in pairs]
    if len(names) != len(set(names)) or set(names) != set(dst) or len(pairs) != len(ours):
        raise RuntimeError(f"weight map incomplete: unmapped transformers parameters {set(dst) - set(names)}")
    with torch.no_grad():
        for p, h in pairs:
            if p.shape != dst[h].shape:
                raise RuntimeError(f"{h}: ours {tuple(p.shape)} vs transformers {tuple(dst[h].shape)}")
            dst[h].copy_(p)
    return hf.to(dtype)


def hf_generate(hf, embeds: torch.Tensor, n: int) -> tuple[list[list[int]], float]:
    """Greedy, exactly ``n`` new tokens for each row of ``embeds`` [B, L, H]; (tokens, seconds)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                          eos_token_id=None, pad_token_id=0)
    return out[:, -n:].tolist(), time.perf_counter() - t0


def leading_equal(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run_baseline(bundle, cases: list[BenchCase], threads: int = 0, checkpoint: Path | None = None,
                 echo: Callable[[str], None] = print, repeats: int = 1) -> list[BaselineRow]:
    """Every cell the bundle ran, on transformers with the same weights, in this process
    (the median of ``repeats`` timed runs after a warm-up, as for the bundle)."""
    from vlm2om.exporters.families import make_reference

    torch.set_num_threads(threads or os.cpu_count() or 1)
    src = reference_source(bundle, checkpoint)
    echo(f"baseline: transformers LlamaForCausalLM (eager) with the weights of {src.label} ...")
    mods = src.recipe.build_modules(src.options)
    dtype = getattr(torch, bundle.manifest.get("dtype", "float32"))
    hf = hf_llama(mods, dtype)
    ref = make_reference(mods, bundle.manifest)
    memory, rows, warmed = PeakMemory(), [], set()
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "bench.png"
        for case in cases:
            _save(case.image, image)
            embeds = torch.from_numpy(np.stack(case.prompts)).to(dtype)
            if case.batch not in warmed:  # first call of a batch size: allocations, not speed
                _encode(ref, image, 1)
                hf_generate(hf, embeds, 2)
                warmed.add(case.batch)
            memory.reset()
            n, runs = case.output_length, []
            for _ in range(max(1, repeats)):
                image_s = _encode(ref, image, case.batch)
                t1 = hf_generate(hf, embeds, 1)[1]
                tokens, tn = hf_generate(hf, embeds, n)
                runs.append((image_s, t1, tn))
            image_s, t1, tn = (statistics.median(r[i] for r in runs) for i in range(3))
            row = BenchRow(case.batch, case.input_length, n, first_token_ms=1000 * t1,
                           ms_per_token=1000 * (tn - t1) / max(1, n - 1), image_ms=1000 * image_s,
                           peak_mb=memory.peak_mb())
            agreed = sum(leading_equal(t, c) for t, c in zip(tokens, case.tokens))
            echo(f"torch batch {case.batch}, {case.input_length} in / {n} out: first token {row.first_token_ms:.1f} "
                 f"ms, {row.ms_per_token:.2f} ms/token; greedy tokens equal {agreed}/{n * case.batch}")
            rows.append(BaselineRow(row, agreed))
    return rows


def _encode(ref, image: Path, count: int) -> float:
    """Seconds to preprocess and encode ``count`` images with the torch image modules."""
    t0 = time.perf_counter()
    for _ in range(count):
        ref.image_embeds(image)
    return time.perf_counter() - t0


def _save(image, path: Path) -> None:
    from PIL import Image

    if isinstance(image, Image.Image):
        image.save(path)
    else:
        path.write_bytes(Path(image).read_bytes())
