"""exporters/llm/chatglm.py: the ChatGLM spec's graphs, roles, example inputs, manifest entry and
reference forward. The reference forward is checked against SwissArmyTransformer's full
recompute (skipped without SAT), the example positions against tests/helpers/chatglm_sat.py's
``glm_positions`` (checked against SAT in tests/graphs/test_chatglm.py), the exported graphs
against their torch modules at every gear."""
from __future__ import annotations

import onnxruntime as ort
import torch
from torch import nn

from tests.helpers.chatglm_bundle import split_group
from tests.helpers.chatglm_sat import build_sat_chatglm, glm_ids, glm_positions, load_into_sat, sat_or_skip
from tests.helpers.hf_weights import close, randomize
from vlm2om.exporters.core.onnx_export import export_onnx
from vlm2om.exporters.core.options import Gears
from vlm2om.exporters.llm.chatglm import ChatGLMSpec, glm_2d_positions, random_llm, tokenizer_entry
from vlm2om.graphs.chatglm import ChatGLMConfig, ChatGLMDecoderGroup, ChatGLMEmbedding

TINY = dict(vocab_size=128, hidden=64, layers=4, heads=4, ffn=160, max_positions=64, rope_precision="fp32")
BOUNDS = [(0, 2), (2, 4)]
SEQ, CACHE = [1, 6], [8, 12]


def modules(seed: int = 0):
    cfg = ChatGLMConfig(**TINY)
    ours = randomize(nn.ModuleDict({"embed": ChatGLMEmbedding(cfg), "group": ChatGLMDecoderGroup(cfg, 0, cfg.layers, kv_layout="per_layer")}),
                     seed, std=0.1)
    return cfg, ours, split_group(cfg, ours["group"], BOUNDS)


def test_positions_are_the_reference_rule():
    for prompt, total in ((3, 9), (8, 8), (5, 12)):
        got = glm_2d_positions(torch.arange(total)[None], torch.tensor([prompt]))[0]
        assert torch.equal(got, glm_positions(prompt - 1, total)), (prompt, total)


def test_subgraphs_roles_and_kv_entry():
    cfg, _, groups = modules()
    spec = ChatGLMSpec(cfg, kv_layout="per_layer")
    assert (spec.attention, spec.positions, spec.kv_layout) == ("prefix_lm", {"kind": "glm_2d"}, "per_layer")
    embed = spec.embed_subgraph(lambda: None, SEQ, "float32")
    assert [(d.name, d.role) for d in embed.inputs + embed.outputs] == [("input_ids", "token_ids"),
                                                                       ("inputs_embeds", "embeds")]
    first, last = (spec.group_subgraph(i, lambda: g, b, SEQ, CACHE, "float16")
                   for i, (g, b) in enumerate(zip(groups, BOUNDS)))
    ins = {d.name: (d.role, d.dims, d.layer) for d in first.inputs}
    assert ins["position_ids"] == ("positions_2d", ("batch", 2, "seq"), None)
    assert ins["past_key_1"] == ("past_key", ("batch", cfg.heads, "cache", cfg.head_dim), 1)
    assert [d.name for d in first.outputs] == ["hidden_states_out", "present_key_0", "present_value_0",
                                               "present_key_1", "present_value_1"]
    assert "logits_index" not in ins and last.inputs[-1].role == "logits_index"
    assert last.outputs[0].dims == ("batch", cfg.vocab_size) and last.outputs[0].dtype == "float32"
    assert [d.layer for d in last.outputs[1:]] == [2, 2, 3, 3] and last.extra == {"layers": [2, 4]}
    kv = spec.kv_manifest(BOUNDS, [12, 8], "float16")
    assert (kv["kind"], kv["group_layers"], kv["num_layers"], kv["kv_heads"], kv["capacity_gears"]) == \
        ("per_layer", [2, 2], 4, cfg.heads, [8, 12])


def test_example_inputs_are_valid_glm_positions():
    """Every gear's example positions are a prompt's rule (some prompt P: [gMASK] at P - 2) at
    indices after the valid cache slots, within the RoPE table a graph built for these gears has."""
    cfg, _, groups = modules()
    sg = ChatGLMSpec(cfg, kv_layout="per_layer").group_subgraph(1, lambda: groups[1], BOUNDS[1], SEQ, CACHE, "float32")
    rope = max(CACHE) + max(SEQ)
    for seed in range(20):
        for gear in sg.gears:
            f = sg.make_inputs(gear, torch.Generator().manual_seed(seed))
            pos, mask = f["position_ids"], f["attention_mask"]
            assert pos.shape == (gear["batch"], 2, gear["seq"]) and pos.dtype == torch.int64
            start = int(mask[0].sum())
            index = start + torch.arange(gear["seq"])[None]
            fits = [p for p in range(2, max(3, start + gear["seq"] + 1))
                    if torch.equal(pos[0], glm_2d_positions(index, torch.tensor([p]))[0])]
            assert fits, (gear, pos[0])
            assert 0 <= int(pos.min()) and int(pos.max()) < rope
            assert f["past_key_2"].shape == (gear["batch"], cfg.heads, gear["cache"], cfg.head_dim)


@torch.no_grad()
def test_exported_groups_match_torch_at_every_gear(tmp_path):
    cfg, ours, groups = modules(seed=3)
    spec = ChatGLMSpec(cfg, kv_layout="per_layer")
    subgraphs = [spec.embed_subgraph(lambda: ours["embed"], SEQ, "float32")]
    subgraphs += [spec.group_subgraph(i, lambda g=g: g, b, SEQ, CACHE, "float32")
                  for i, (g, b) in enumerate(zip(groups, BOUNDS))]
    for sg in subgraphs:
        module = sg.build().eval()
        sess = ort.InferenceSession(str(export_onnx(sg, module, tmp_path)[0]), providers=["CPUExecutionProvider"])
        for gear in sg.gears:
            feeds = sg.make_inputs(gear, torch.Generator().manual_seed(gear["seq"] + gear.get("cache", 0)))
            want = module(*(feeds[d.name] for d in sg.inputs))
            want = want if isinstance(want, tuple) else (want,)
            got = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
            for decl, w, g in zip(sg.outputs, want, got):
                close(torch.from_numpy(g), w, f"{sg.name} {decl.name} at {gear}", 1e-5)


@torch.no_grad()
def test_reference_forward_is_sats_full_recompute():
    """Groups chained by reference_forward over context + answer, told where the context ends."""
    sat_or_skip()
    cfg, ours, groups = modules(seed=5)
    sat = build_sat_chatglm(cfg)
    load_into_sat(ours, sat, cfg)
    text, answer = [17, 23, 29, 31, 37], [41, 43, 47]
    ids = glm_ids(text, answer)
    want = sat(input_ids=ids[None])[0][0]
    for prompt, seq in ((len(text) + 2, ids), (len(ids), ids[:len(text) + 2])):
        x = ours["embed"](seq[None])
        for g in groups:
            x = ChatGLMSpec.reference_forward(g, x, None if prompt == len(ids) else prompt)
        close(x[0], want[:len(seq)], f"prompt {prompt}", 2e-5)


def test_random_llm_parts():
    cfg = ChatGLMConfig(**TINY)
    parts = random_llm(cfg, Gears(seq=(1, 96), cache=(64,), layers_per_group=3, kv_layout="per_layer"), 0, "float16",
                       tokenizer_entry(121, 122))
    assert parts.bounds == [(0, 3), (3, 4)] and isinstance(parts.spec, ChatGLMSpec) and parts.llama is cfg
    assert parts.spec.tokenizer["bos_id"] == 121 and parts.spec.tokenizer["eos_ids"] == [122]
    last = parts.build_group(1)
    assert last.is_last and last.layers[0].attention.coeff == 4.0 and last.rope_cos.shape[0] == 160
    assert last.lm_head.weight.dtype == torch.float16 and parts.build_embed().word_embeddings.weight.shape == (128, 64)


def test_the_lm_head_group_holds_one_layer():
    """ChatGLM's 130528-row lm_head sits in a group of one layer; the others take layers_per_group."""
    from vlm2om.exporters.llm.chatglm import chatglm_bounds
    from vlm2om.exporters.llm.common import group_bounds

    real = ChatGLMConfig()
    bounds = chatglm_bounds(real, Gears(seq=(1,), cache=(8,), layers_per_group=2))
    assert len(bounds) == 15 and bounds[-2:] == [(26, 27), (27, 28)] and bounds[0] == (0, 2)
    assert [b - a for a, b in bounds] == [2] * 13 + [1, 1]
    assert group_bounds(4, 3) == [(0, 3), (3, 4)] and group_bounds(5, 2, last=1) == [(0, 2), (2, 4), (4, 5)]
    assert group_bounds(3, 1, last=1) == [(0, 1), (1, 2), (2, 3)] and group_bounds(1, 2, last=1) == [(0, 1)]
