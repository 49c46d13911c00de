"""Export options that apply to every recipe: batch gears, golden files, recorded thresholds.

They change what ``write_bundle`` does with any plan rather than what a recipe builds, so
they travel beside the plan: ``write_bundle(..., extras=...)``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from vlm2om.exporters.ascend.atc import MAX_GEARS
from vlm2om.exporters.core.options import check_gear_lists, gear_count_error
from vlm2om.exporters.verify.metrics import E2E_THRESHOLDS, THRESHOLDS

BATCH_DIM = "batch"


@dataclass(frozen=True)
class ExportExtras:
    golden: bool = False  # store golden inputs/outputs (golden.npz) for `vlm2om verify --golden`
    batch_gears: tuple[int, ...] = ()  # e.g. (1, 2, 4, 8): a batch gear dim on embed/decoder graphs


def check_batch_gears(values) -> tuple[int, ...]:
    batches = tuple(sorted(set(int(v) for v in values)))
    check_gear_lists(None, None, batches)
    return batches


def apply_batch_gears(plan, batches: tuple[int, ...]) -> None:
    """Give every graph whose tensors carry a ``batch`` dim one gear per batch value.

    The image graphs stay at batch 1 (an image is encoded once per conversation); the embed
    and decoder graphs get seq x cache x batch gears, which ATC caps at 100 per graph."""
    batches = check_batch_gears(batches)
    if len(batches) < 2:
        return
    for sg in plan.subgraphs:
        if not any(BATCH_DIM in d.dims for d in [*sg.inputs, *sg.outputs]):
            continue
        base = list({tuple(sorted((k, v) for k, v in g.items() if k != BATCH_DIM)): None for g in sg.gears})
        gears = [{**dict(b), BATCH_DIM: n} for b, n in itertools.product(base, batches)]
        if len(gears) > MAX_GEARS:
            raise gear_count_error([("its seq x cache gears", len(base)), ("--batch-gears", len(batches))],
                                   f"graph '{sg.name}'")
        sg.gears = gears
    plan.provenance.setdefault("options", {})["batch_gears"] = list(batches)


def verification_entry(dtype: str, golden: dict | None) -> dict:
    """The manifest's ``verification`` key: the thresholds every check of this bundle uses."""
    entry = {"dtype": dtype, "thresholds": THRESHOLDS[dtype], "thresholds_by_dtype": THRESHOLDS,
             "end_to_end": E2E_THRESHOLDS[dtype]}
    if golden:
        entry["golden"] = golden
    return entry
