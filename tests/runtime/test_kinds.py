"""The runtime reads kinds from the manifest: schema versions, tasks, tensor roles, attention
and prompt kinds. Each kind is checked on the tiny MiniGPT-4 bundle, against the tokens the
bundle gives as exported (so a kind that changed the numbers fails)."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from tests.helpers.bundles import as_version_1, copy_bundle
from vlm2om.runtime import Bundle, BundleError, GenerationConfig, InputError, open_bundle
from vlm2om.runtime.decoder import Decoder
from vlm2om.runtime.schema import V1_ROLES

GREEDY = GenerationConfig(max_new_tokens=10, do_sample=False, stop_on_eos=False, stop_strings=())
QUESTIONS = ("What is in the picture?", "And the colours?")


def _edit(bundle, change) -> None:
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


def _two_turns(pipe, image):
    chat, out = pipe.chat(image), []
    for q in QUESTIONS:
        list(chat.ask(q, GREEDY))
        out.append((chat.last.tokens, chat.last.reused_tokens))
    return out


@pytest.fixture(scope="module")
def reference_turns(tiny_bundle, sample_image):
    return _two_turns(open_bundle(tiny_bundle), sample_image)


def test_version_1_bundle_runs_as_exported(tmp_path, tiny_bundle, sample_image, reference_turns):
    old = copy_bundle(tiny_bundle, tmp_path)
    _edit(old, as_version_1)
    b = Bundle.open(old)
    assert b.manifest["schema_version"] == 2 and b.task == "chat"
    assert json.loads((old / "manifest.json").read_text())["schema_version"] == 1  # read, never rewritten
    roles = {s["name"]: s["role"] for s in b.graph("decoder_1")["inputs"] + b.graph("decoder_1")["outputs"]}
    assert roles == {k: V1_ROLES[k] for k in roles}
    assert _two_turns(open_bundle(old), sample_image) == reference_turns


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(schema_version=3), "schema_version 3 is not supported"),
    (lambda m: m.update(task="classify"), "task 'classify'"),
    (lambda m: m["graphs"]["decoder_0"]["inputs"][1].update(role="positions_3d"), "role 'positions_3d'"),
    (lambda m: m["pipeline"].update(attention="sliding"), "attention kind 'sliding'"),
    (lambda m: m["prompt"].update(kind="chatml"), "prompt kind 'chatml'"),
])
def test_unknown_kinds_are_named_at_open(tmp_path, tiny_bundle, change, message):
    b = copy_bundle(tiny_bundle, tmp_path)
    _edit(b, change)
    with pytest.raises(BundleError, match=message):
        pipe = open_bundle(b)
        pipe.chat()


def test_feeds_follow_roles_not_names(tiny_bundle, sample_image, reference_turns):
    """Rename every decoder tensor in the manifest and behind the sessions: the same tokens come
    out, since the runtime looks tensors up by role."""
    pipe = open_bundle(tiny_bundle)
    renamed = copy.deepcopy(pipe.bundle.manifest)
    for name in ["embed", *renamed["pipeline"]["decoder_graphs"]]:
        for spec in [*renamed["graphs"][name]["inputs"], *renamed["graphs"][name]["outputs"]]:
            spec["name"] = "x_" + spec["name"]

    class Renamed:
        def __init__(self, sess):
            self.sess = sess

        def run(self, feeds):
            out = self.sess.run({k.removeprefix("x_"): v for k, v in feeds.items()})
            return {"x_" + k: v for k, v in out.items()}

    sessions = {n: Renamed(s) for n, s in pipe.sessions.items()}
    pipe.decoder = Decoder(Bundle(pipe.bundle.root, renamed), sessions)
    assert _two_turns(pipe, sample_image) == reference_turns


def test_image_mask_and_prefix_length_roles(tiny_bundle, sample_image, reference_turns):
    """A decoder input with role ``image_mask`` (InternLM-XComposer2's im_mask) is 1 on image
    positions in prefill and 0 in every decode step; ``prefix_length`` carries the context length."""
    pipe = open_bundle(tiny_bundle)
    m = copy.deepcopy(pipe.bundle.manifest)
    for name in m["pipeline"]["decoder_graphs"]:
        m["graphs"][name]["inputs"] += [{"name": "im_mask", "dtype": "float16", "shape": [1, "seq"],
                                         "role": "image_mask"},
                                        {"name": "prefix", "dtype": "int64", "shape": [1], "role": "prefix_length"}]
    seen = []

    class Recording:
        def __init__(self, sess, first):
            self.sess, self.first = sess, first

        def run(self, feeds):
            if self.first:
                seen.append((feeds["im_mask"].copy(), feeds["prefix"].copy(), feeds["position_ids"].copy()))
            return self.sess.run({k: v for k, v in feeds.items() if k not in ("im_mask", "prefix")})

    first = m["pipeline"]["decoder_graphs"][0]
    sessions = {n: Recording(s, n == first) for n, s in pipe.sessions.items()}
    pipe.decoder = Decoder(Bundle(pipe.bundle.root, m), sessions)
    chat = pipe.chat(sample_image)
    list(chat.ask(QUESTIONS[0], GREEDY))
    assert chat.last.tokens == reference_turns[0][0]
    keys = chat.last.layout.keys
    prompt = len(keys)
    mask = np.concatenate([f[0, :min(f.shape[1], prompt - int(p[0, 0]))] for f, _, p in seen
                           if p[0, 0] < prompt])
    assert mask.dtype == np.float16
    assert mask.tolist() == [0.0 if isinstance(k, int) else 1.0 for k in keys]
    decode = [(f, n) for f, n, p in seen if p[0, 0] >= prompt]
    assert len(decode) == len(chat.last.tokens) - 1 and all(not f.any() and n[0] == prompt for f, n in decode)


def test_prefix_lm_prefills_in_one_chunk_and_never_reuses(tmp_path, tiny_opts, sample_image):
    """Declared prefix-LM, a bundle prefills each turn's whole context in one chunk (a seq gear
    must hold it) and reuses no cached prefix."""
    import dataclasses

    from vlm2om.exporters.core.driver import write_bundle
    from vlm2om.exporters.families import get_family

    opts = dataclasses.replace(tiny_opts, seq_gears=(1, 16, 256))
    causal = write_bundle(get_family("minigpt4").plan(opts), tmp_path / "causal", echo=lambda s: None).root
    expected = _two_turns(open_bundle(causal), sample_image)
    b = copy_bundle(causal, tmp_path, "prefix")
    _edit(b, lambda m: m["pipeline"].update(attention="prefix_lm"))
    pipe = open_bundle(b)
    assert not pipe.decoder.reuses_prefix
    chunks = []
    plan = pipe.decoder.chunks
    pipe.decoder.chunks = lambda n, cache: chunks.append(plan(n, cache)) or chunks[-1]
    turns = _two_turns(pipe, sample_image)
    # The tiny graph is causal, so one chunk gives the tokens of the chunked prefill.
    assert [t for t, _ in turns] == [t for t, _ in expected]
    assert [r for _, r in turns] == [0, 0] and expected[1][1] > 0
    assert chunks and all(len(c) == 1 for c in chunks) and max(c[0] for c in chunks) > 16
    with pytest.raises(InputError, match="must be prefilled in one chunk"):
        plan(257, pipe.decoder.new_cache())


def test_chat_survives_a_turn_that_does_not_fit(tiny_bundle, sample_image, reference_turns):
    pipe = open_bundle(tiny_bundle)
    chat = pipe.chat(sample_image)
    list(chat.ask(QUESTIONS[0], GREEDY))
    with pytest.raises(InputError, match="largest cache gear"):
        list(chat.ask("the " * 400, GREEDY))
    list(chat.ask(QUESTIONS[1], GREEDY))
    assert (chat.last.tokens, chat.last.reused_tokens) == reference_turns[1]


def test_per_layer_kv_layout_gives_the_stacked_tokens(tmp_path, tiny_opts, tiny_bundle, sample_image,
                                                       reference_turns):
    """``--kv-layout per_layer``: a key and a value input per layer (same weights), the same tokens
    in chat (with a reused prefix) and in a batch, and a graph with no Split of the cache."""
    import dataclasses

    import onnx

    from vlm2om.exporters.ascend.lint import errors, lint_path
    from vlm2om.exporters.core.driver import write_bundle
    from vlm2om.exporters.core.extras import ExportExtras
    from vlm2om.exporters.families import get_family
    from vlm2om.runtime.batch import generate_batch

    plan = get_family("minigpt4").plan(dataclasses.replace(tiny_opts, kv_layout="per_layer"))
    out = write_bundle(plan, tmp_path / "per_layer", echo=lambda s: None,
                       extras=ExportExtras(batch_gears=(1, 2))).root
    assert not errors(lint_path(out))
    pipe = open_bundle(out)
    m = pipe.bundle.manifest
    assert m["kv_cache"]["kind"] == "per_layer" and m["provenance"]["options"]["kv_layout"] == "per_layer"
    last = m["graphs"]["decoder_1"]
    assert [(s["name"], s["role"], s["layer"]) for s in last["inputs"][3:5]] == [
        ("past_key_1", "past_key", 1), ("past_value_1", "past_value", 1)]
    assert not any(n.op_type == "Split" and "past" in n.input[0]
                   for n in onnx.load(str(out / last["file"])).graph.node)
    assert _two_turns(pipe, sample_image) == reference_turns
    res = generate_batch(pipe, [sample_image, sample_image], list(QUESTIONS), GREEDY)
    single = generate_batch(open_bundle(tiny_bundle), [sample_image], [QUESTIONS[1]], GREEDY)
    assert res.sequences[0].tokens == reference_turns[0][0] and res.sequences[1].tokens == single.sequences[0].tokens


@pytest.mark.parametrize("gears", [{"cache_gears": (256,)}, {"seq_gears": (1,)}], ids=["one-cache-gear", "one-seq-gear"])
def test_a_bundle_with_one_gear_of_a_dim_runs(tmp_path, tiny_opts, sample_image, reference_turns, gears):
    """One value in --cache-gears or --seq-gears makes that dim static in the graphs (no gear dim);
    the runtime takes its value from the graph's shapes and gives the tokens of the geared bundle."""
    import dataclasses

    from vlm2om.exporters.core.driver import write_bundle
    from vlm2om.exporters.families import get_family

    plan = get_family("minigpt4").plan(dataclasses.replace(tiny_opts, **gears))
    out = write_bundle(plan, tmp_path / "one", echo=lambda s: None).root
    dims = {d for g in (Bundle.open(out).graph("decoder_0")["gears"] or [{}]) for d in g}
    assert ("cache" if "cache_gears" in gears else "seq") not in dims
    assert [t for t, _ in _two_turns(open_bundle(out), sample_image)] == [t for t, _ in reference_turns]
