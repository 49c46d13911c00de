"""Every subgraph of the tiny bundle, run through the runtime's own session on a gear the
export did not verify, equals its torch module (fp32, tight tolerance)."""
from __future__ import annotations

import numpy as np
import torch

from vlm2om.exporters.families.minigpt4 import recipe as minigpt4
from vlm2om.runtime.bundle import Bundle
from vlm2om.runtime.backends import open_session


def test_every_subgraph_on_an_unverified_gear(tiny_bundle, tiny_opts, tiny_modules):
    bundle = Bundle.open(tiny_bundle)
    plan = minigpt4.plan(tiny_opts)  # same seeded weights, rebuilt per graph
    assert [s.name for s in plan.subgraphs] == list(bundle.manifest["graphs"])
    for sg in plan.subgraphs:
        gear = sg.gears[len(sg.gears) // 2]  # a middle gear: neither the traced nor the smallest
        feeds = sg.make_inputs(gear, torch.Generator().manual_seed(7))
        with torch.no_grad():
            expected = sg.build()(*[feeds[d.name] for d in sg.inputs])
        expected = expected if isinstance(expected, tuple) else (expected,)
        sess = open_session("ort", bundle, sg.name)
        got = sess.run({k: v.numpy() for k, v in feeds.items()})
        for decl, e in zip(sg.outputs, expected):
            np.testing.assert_allclose(got[decl.name], e.numpy(), rtol=1e-4, atol=1e-5,
                                       err_msg=f"{sg.name}.{decl.name} at {gear}")


def test_manifest_records_the_contract(tiny_bundle):
    m = Bundle.open(tiny_bundle).manifest
    assert m["provenance"]["opset"] == 13
    for name, g in m["graphs"].items():
        assert m["files"][g["file"]]["sha256"]
        assert m["atc"]["commands"][name].startswith("atc --model=")
    dec = m["graphs"]["decoder_0"]
    assert {tuple(sorted(x)) for x in dec["gears"]} == {("cache", "seq")}
    assert [i["name"] for i in dec["inputs"]] == ["hidden_states", "position_ids", "attention_mask", "past_kv"]
    assert m["kv_cache"]["group_layers"] == [1, 1]
    assert m["graphs"]["vision"]["gears"] is None
