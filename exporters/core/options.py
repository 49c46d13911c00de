"""The export options every family takes, the dtype rule and the gear plan (no torch here, so
bad options are refused before torch is imported)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from vlm2om.runtime.errors import InputError

from vlm2om.exporters.ascend.atc import MAX_GEARS

DTYPES = ("float16", "float32")
# How a decoder group takes its KV cache (graphs/llama.py): one stacked tensor per group (fewest
# dynamic dims per ATC gear), or a key and a value per layer (no per-step copy on onnxruntime).
KV_LAYOUTS = ("stacked", "per_layer")


@dataclass(frozen=True)
class Gears:
    """Prompt-chunk lengths, KV-cache capacities and decoder layers per ONNX file."""

    seq: tuple[int, ...]
    cache: tuple[int, ...]
    layers_per_group: int
    kv_layout: str = "stacked"

    @property
    def rope_length(self) -> int:
        """Positions a RoPE table must cover: a full cache plus one padded prefill chunk."""
        return max(self.cache) + max(self.seq)


@dataclass(frozen=True)
class RecipeOptions:
    """Options every family takes (the CLI's); a family subclasses it to add its own."""

    preset: str | None = "tiny"
    checkpoint: Path | None = None
    dtype: str | None = None  # default: float16 for a checkpoint (ATC's own default), else float32
    seq_gears: tuple[int, ...] | None = None
    cache_gears: tuple[int, ...] | None = None
    layers_per_group: int | None = None
    seed: int = 0
    kv_layout: str | None = None  # default: the preset's, else stacked

    @property
    def export_dtype(self) -> str:
        dtype = self.dtype or ("float16" if self.checkpoint is not None else "float32")
        if dtype not in DTYPES:
            raise InputError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
        return dtype

    def provenance(self, gears: Gears) -> dict:
        """The options as recorded in the manifest: the common ones, then a family's own."""
        own = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in {g.name for g in fields(RecipeOptions)}}
        return {"preset": self.preset if self.checkpoint is None else None,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "dtype": self.export_dtype, "seq_gears": list(gears.seq), "cache_gears": list(gears.cache),
                "layers_per_group": gears.layers_per_group, "seed": self.seed,
                **({"kv_layout": gears.kv_layout} if gears.kv_layout != "stacked" else {}),
                **{k: v for k, v in own.items() if isinstance(v, (str, int, float, bool))},
                # configs the checkpoint's shapes cannot tell (head counts), for rebuilding the reference
                **{k: asdict(v) for k, v in own.items() if is_dataclass(v)}}


def resolve_gears(opts: RecipeOptions, presets: Mapping[str, Gears], real: Gears) -> Gears:
    """The options' gears, else the preset's (no checkpoint), else the real-size defaults."""
    base = presets.get(opts.preset) if opts.checkpoint is None else None
    where = f"the {opts.preset} preset's" if base else "the default"
    base = base or real
    check_gear_lists(opts.seq_gears, opts.cache_gears)
    seq = tuple(sorted(set(opts.seq_gears or base.seq)))
    cache = tuple(sorted(set(opts.cache_gears or base.cache)))
    if 1 not in seq:
        raise InputError(f"--seq-gears must include 1 for decoding, got {seq}")
    if len(seq) * len(cache) > MAX_GEARS:
        raise gear_count_error([("--seq-gears" if opts.seq_gears else f"{where} seq gears", len(seq)),
                                ("--cache-gears" if opts.cache_gears else f"{where} cache gears", len(cache))])
    layout = opts.kv_layout or base.kv_layout
    if layout not in KV_LAYOUTS:
        raise InputError(f"--kv-layout {layout}: choose one of {', '.join(KV_LAYOUTS)}")
    return Gears(seq, cache, opts.layers_per_group or base.layers_per_group, layout)


def check_gear_lists(seq: tuple[int, ...] | None, cache: tuple[int, ...] | None,
                     batch: tuple[int, ...] | None = None) -> None:
    """What the gear options alone can tell, before any family (or torch) is imported: values
    of at least 1, a seq gear of 1 (decoding feeds one token), a batch gear of 1, and no more
    gears per graph than ATC compiles (an option left out counts as one value here; the
    preset's lists are counted once they are known)."""
    for flag, values in (("--seq-gears", seq), ("--cache-gears", cache), ("--batch-gears", batch)):
        bad = [v for v in values or () if v < 1]
        if bad:
            raise InputError(f"{flag} {','.join(map(str, values))}: every gear must be at least 1, "
                             f"got {', '.join(map(str, bad))}")
    if seq and 1 not in seq:
        raise InputError(f"--seq-gears {','.join(map(str, seq))}: must include 1 (decoding feeds one token at a time)")
    if batch and 1 not in batch:
        raise InputError(f"--batch-gears {','.join(map(str, batch))}: must include 1 (single conversations run at "
                         "batch 1)")
    given = [(flag, len(set(v))) for flag, v in (("--seq-gears", seq), ("--cache-gears", cache),
                                                 ("--batch-gears", batch)) if v]
    if math.prod(n for _, n in given) > MAX_GEARS:
        raise gear_count_error(given)


def gear_count_error(parts: list[tuple[str, int]], graph: str = "each decoder graph") -> InputError:
    """ATC's limit, naming where each factor of the count comes from."""
    total = math.prod(n for _, n in parts)
    terms = " x ".join(f"{what} ({n})" for what, n in parts)
    return InputError(f"{terms} = {total} gears for {graph}; ATC compiles at most {MAX_GEARS} gears per graph: "
                      "give fewer values")


def check_preset(opts: RecipeOptions, presets: Mapping) -> None:
    if opts.checkpoint is None and opts.preset not in presets:
        raise InputError(f"unknown preset '{opts.preset}' (available: {', '.join(presets)})")


def build_parts(opts: RecipeOptions, presets: Mapping[str, Any], real: Gears,
                random_parts: Callable[[str, Any, Gears], Any], loader: str):
    """A family's parts: seeded random weights for a preset (``presets[name].gears``), or a
    checkpoint folder read by the ``load_parts(opts, gears)`` of the module ``loader`` (imported
    only then; it checks every key up front)."""
    import importlib

    gears = resolve_gears(opts, {k: p.gears for k, p in presets.items()}, real)
    check_preset(opts, presets)
    if opts.checkpoint is None:
        return random_parts(opts.preset, opts, gears)
    return importlib.import_module(loader).load_parts(opts, gears)
