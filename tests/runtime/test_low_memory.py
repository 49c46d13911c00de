"""``low_memory`` sessions (``vlm2om run --low-memory``): one graph in memory at a time.

onnxruntime's output arrays live in the session's memory arena and keep it alive after the
session is dropped; a 7B prefill chunk's arena is about 1.5 GB a decoder group, so kept outputs
(the KV cache rows, the hidden states) once held every group's arena at once (22 GB for
InternLM-XComposer2-VL). The streamed session hands back copies and runs without an arena."""
from __future__ import annotations

import numpy as np

from vlm2om.runtime.backends import open_session
from vlm2om.runtime.bundle import Bundle


def _feeds(session):
    gear = session.gears[0] if session.gears else {}  # the smallest
    return {s.name: np.zeros([gear.get(d, d) if isinstance(d, str) else d for d in s.shape], s.dtype)
            for s in session.inputs}


def test_streamed_outputs_own_their_memory(tiny_bundle):
    bundle = Bundle.open(tiny_bundle)
    streamed = open_session("ort", bundle, "decoder_0", low_memory=True)
    kept = open_session("ort", bundle, "decoder_0")
    feeds = _feeds(kept)
    got, want = streamed.run(feeds), kept.run(feeds)
    assert set(got) == set(want)
    for name, value in got.items():
        assert value.flags.owndata, name  # not a view into the closed session's arena
        np.testing.assert_array_equal(value, want[name])


def test_streamed_ort_sessions_run_without_an_arena(tiny_bundle, monkeypatch):
    from vlm2om.runtime.backends import ort as ort_backend

    seen = []
    real = ort_backend.OrtSession.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("arena", True))
        real(self, *args, **kwargs)

    monkeypatch.setattr(ort_backend.OrtSession, "__init__", spy)
    bundle = Bundle.open(tiny_bundle)
    open_session("ort", bundle, "embed", low_memory=True).run(_feeds(open_session("ort", bundle, "embed")))
    assert seen == [True, False]  # the plain session keeps its arena, the streamed one has none
