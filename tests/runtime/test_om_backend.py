"""The OM backend, run against the ais_bench STAND-IN (tests/helpers/ais_bench_standin.py) on OM
files from the FAKE ATC (tests/helpers/fake_cann.py): the production code path is the real one, only
the module behind ``ais_bench.infer.interface`` is a stand-in that computes with onnxruntime."""
from __future__ import annotations

import os

import numpy as np
import pytest

from tests.helpers import ais_bench_standin as standin
from tests.helpers import run_cli
from tests.helpers.bundles import copy_bundle
from tests.helpers.fake_cann import install_fake_cann
from vlm2om.exporters.ascend.compile import CompileOptions, compile_bundle
from vlm2om.runtime import Bundle, BundleError, GenerationConfig, InputError, open_bundle
from vlm2om.runtime.backends import open_session, resolve_backend

GREEDY = GenerationConfig(do_sample=False, max_new_tokens=12, stop_on_eos=False)


@pytest.fixture(scope="module")
def compiled(tiny_bundle, tmp_path_factory):
    """A copy of the tiny bundle compiled by the fake ATC: its manifest records the OM files."""
    root = tmp_path_factory.mktemp("om")
    dst = copy_bundle(tiny_bundle, root)
    with pytest.MonkeyPatch.context() as mp:
        install_fake_cann(root / "Ascend", mp)
        compile_bundle(dst, CompileOptions(), echo=lambda s: None)
    return dst


@pytest.fixture
def npu(monkeypatch):
    standin.install(monkeypatch)
    return standin


def test_standin_is_strict(compiled, npu):
    sess = npu.InferSession(0, str(compiled / "om" / "embed_linux_x86_64.om"))
    assert [i.shape for i in sess.get_inputs()] == [[1, -1]]
    ids = np.zeros((1, 16), np.int64)
    out = sess.infer([ids], mode="dymdims")
    assert out[0].shape == (16 * 64,)  # flat
    with pytest.raises(TypeError, match="bare array"):
        sess.infer(ids, mode="dymdims")
    with pytest.raises(RuntimeError, match="not a compiled gear"):
        sess.infer([np.zeros((1, 5), np.int64)], mode="dymdims")
    with pytest.raises(RuntimeError, match="compiled for 'dymdims'"):
        sess.infer([ids], mode="static")
    with pytest.raises(RuntimeError, match="not one of"):
        sess.infer([ids], mode="dyndims")  # the API guide's spelling, which the real code rejects
    with pytest.raises(RuntimeError, match="int64"):
        sess.infer([ids.astype(np.int32)], mode="dymdims")
    sess.free_resource()
    with pytest.raises(RuntimeError, match="free_resource"):
        sess.infer([ids], mode="dymdims")


def test_om_session_feeds_gears_in_order_and_reshapes(compiled, npu):
    bundle = Bundle.open(compiled)
    dec = open_session("om", bundle, "decoder_0", device_id=3, threads=2)
    assert [s.name for s in dec.inputs] == ["hidden_states", "position_ids", "attention_mask", "past_kv"]
    feeds = {"past_kv": np.zeros((1, 2, 1, 4, 128, 16), np.float32),  # dict order differs from the graph's
             "attention_mask": np.zeros((1, 128), np.float32),
             "position_ids": np.arange(16, dtype=np.int64)[None],
             "hidden_states": np.random.default_rng(0).standard_normal((1, 16, 64)).astype(np.float32)}
    out = dec.run(feeds)
    assert out["hidden_states_out"].shape == (1, 16, 64) and out["present_kv"].shape == (1, 2, 1, 4, 16, 16)
    ort = open_session("ort", bundle, "decoder_0")
    expected = ort.run(feeds)
    for k in expected:
        np.testing.assert_array_equal(out[k], expected[k])
    raw = npu.SESSIONS[-1]
    assert raw.device_id == 3 and raw.calls[-1]["mode"] == "dymdims"
    with pytest.raises(InputError, match="match none of its gears"):  # never sent off-gear
        dec.run({**feeds, "attention_mask": np.zeros((1, 100), np.float32)})
    dec.close()
    assert raw.freed
    vision = open_session("om", bundle, "vision")
    vision.run({"pixel_values": np.zeros((1, 3, 224, 224), np.float32)})
    assert npu.SESSIONS[-1].calls[-1]["mode"] == "static"


def test_om_backend_gives_the_same_tokens_as_onnxruntime(compiled, npu, sample_image):
    ref = open_bundle(compiled, backend="ort")
    om = open_bundle(compiled, backend="om", device_id=0)
    assert {type(s).__name__ for s in om.sessions.values()} == {"OmSession"}
    for pipe in (ref, om):
        pipe.answers = []
        chat = pipe.chat(sample_image)
        for question in ("What is in the picture?", "And what colour is it?"):  # chat reuses the cache
            list(chat.ask(question, GREEDY))
            pipe.answers.append(list(chat.last.tokens))
    assert om.answers == ref.answers and all(om.answers)
    shapes = {c["shapes"][0] for s in npu.SESSIONS for c in s.calls if c["mode"] == "dymdims"}
    assert {(1, 1, 64), (1, 64, 64)} <= shapes  # decode steps and a prefill chunk, each at its own gear
    assert om.generate(sample_image, "Describe it.", GREEDY) == ref.generate(sample_image, "Describe it.", GREEDY)
    om.close()
    assert all(s.freed for s in npu.SESSIONS)


def test_auto_picks_om_only_when_it_can(compiled, tiny_bundle, npu, monkeypatch):
    assert resolve_backend("auto", Bundle.open(compiled)) == "om"
    assert resolve_backend("auto", Bundle.open(tiny_bundle)) == "ort"  # no OM files
    standin.uninstall_for_test(monkeypatch)
    assert resolve_backend("auto", Bundle.open(compiled)) == "ort"  # no ais_bench
    with pytest.raises(BundleError, match="ais_bench"):
        open_session("om", Bundle.open(compiled), "embed")
    with pytest.raises(InputError, match="unknown backend 'npu'"):
        resolve_backend("npu", Bundle.open(compiled))


def test_om_backend_errors(compiled, tiny_bundle, npu, tmp_path):
    with pytest.raises(BundleError, match="no OM file for graph 'embed'.*vlm2om compile"):
        open_session("om", Bundle.open(tiny_bundle), "embed")
    with pytest.raises(InputError, match="unknown session options"):
        open_session("om", Bundle.open(compiled), "embed", device=1)
    bundle = Bundle.open(compiled)
    bundle.manifest["graphs"]["embed"]["inputs"][0]["name"] = "token_ids"
    with pytest.raises(BundleError, match=r"has inputs \['input_ids'\], the manifest declares \['token_ids'\]"):
        open_session("om", bundle, "embed")
    assert npu.SESSIONS[-1].freed  # a session that fails its checks is released
    bundle = Bundle.open(compiled)
    bundle.manifest["graphs"]["decoder_0"]["outputs"].pop()
    with pytest.raises(BundleError, match="has outputs .* the manifest declares"):
        open_session("om", bundle, "decoder_0")


def test_cli_backend_auto_runs_om(compiled, tmp_path, sample_image):
    """`vlm2om run --backend auto` in a fresh process where ais_bench is the stand-in."""
    env = dict(os.environ, PYTHONPATH=standin.subprocess_path(tmp_path))
    base = ["run", compiled, "--image", sample_image, "--prompt", "Hi", "--greedy", "--max-new-tokens", "6", "--stats"]
    om = run_cli(*base, "--device-id", "1", env=env, timeout=120)
    ort = run_cli(*base, "--backend", "ort", env=env, timeout=120)
    assert om.returncode == 0 and ort.returncode == 0, om.stderr + ort.stderr
    assert "backend om" in om.stderr and "backend ort" in ort.stderr
    assert om.stdout == ort.stdout
