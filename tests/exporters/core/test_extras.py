"""Export extras: batch gears multiply every LLM graph's gears, within ATC's limit."""
from __future__ import annotations

import pytest

from vlm2om.runtime import InputError


def test_batch_gears_respect_the_atc_limit(tiny_opts):
    from vlm2om.exporters.families.minigpt4 import recipe as minigpt4
    from vlm2om.exporters.core.extras import apply_batch_gears, check_batch_gears

    plan = minigpt4.plan(tiny_opts.__class__(preset="tiny", seq_gears=(1, 2, 4, 8, 16), cache_gears=(128, 256, 512)))
    limit = r"its seq x cache gears \(15\) x --batch-gears \(8\) = 120 gears for graph 'decoder_0'; ATC compiles"
    with pytest.raises(InputError, match=limit):
        apply_batch_gears(plan, (1, 2, 3, 4, 5, 6, 7, 8))
    with pytest.raises(InputError, match="must include 1"):
        check_batch_gears((2, 4))
    apply_batch_gears(plan, (1, 2, 4))
    dec = next(sg for sg in plan.subgraphs if sg.name == "decoder_0")
    assert len(dec.gears) == 45 and {g["batch"] for g in dec.gears} == {1, 2, 4}
    assert {sg.name for sg in plan.subgraphs if len({g.get("batch", 1) for g in sg.gears}) > 1} == \
        {"embed", "decoder_0", "decoder_1"}  # image graphs stay at batch 1
