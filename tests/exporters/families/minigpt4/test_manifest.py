"""The tiny MiniGPT-4 bundle's graph contract as the manifest records it."""
from __future__ import annotations

from vlm2om.runtime.bundle import Bundle


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
