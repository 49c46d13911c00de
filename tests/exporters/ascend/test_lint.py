"""The ATC lint: the tiny bundle passes; crafted graphs trigger each finding, named by graph,
node and value."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import run_cli
from vlm2om.exporters.ascend import lint
from vlm2om.exporters.ascend.lint import Finding, cann_ops, cann_target, keep_dtype_plan, lint_bundle_files, lint_path


def _io(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _save(tmp_path, nodes, inputs=(("x", [1, "seq"]),), outputs=(("y", [1, "seq"]),), opset=13, ir=8,
          extra_opsets=(), initializers=(), name="g") -> Path:
    graph = helper.make_graph(list(nodes), name, [_io(*i) for i in inputs], [_io(*o) for o in outputs],
                              initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    model.ir_version = ir
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def _entry(path, inputs=(("x", [1, "seq"]),), outputs=(("y", [1, "seq"]),), gears=({"seq": 1}, {"seq": 8})):
    spec = lambda items: [{"name": n, "dtype": "float32", "shape": list(s)} for n, s in items]  # noqa: E731
    return {"file": path.name, "inputs": spec(inputs), "outputs": spec(outputs),
            "gears": list(gears) if gears is not None else None}


def _lint(path, entry=None, cann="7.0", **kw):
    return lint_bundle_files(path.parent, {"g": entry or _entry(path, **kw)}, cann)


def _only(findings, check, severity="error") -> Finding:
    hits = [f for f in findings if f.check == check and f.severity == severity]
    assert len(hits) == 1, findings
    return hits[0]


RELU = helper.make_node("Relu", ["x"], ["y"], name="/act/Relu")


def test_tiny_bundle_lints_clean(tiny_bundle):
    findings = lint_path(tiny_bundle)
    assert [f for f in findings if f.severity != "info"] == []
    plan = keep_dtype_plan(findings)
    assert set(plan) == {"vision", "bridge", "decoder_0", "decoder_1"}  # embed is a Gather
    assert {"/layers.0/input_layernorm/Pow", "/layers.0/input_layernorm/Sqrt",
            "/layers.0/self_attn/Softmax"} <= set(plan["decoder_0"])
    assert "0 errors, 0 warnings" in lint.format_table(findings)


def test_opset_and_ir_version(tmp_path):
    f = _only(_lint(_save(tmp_path, [RELU], opset=19)), "opset")
    assert (f.graph, f.value) == ("g", "19") and "9-18" in f.message
    assert _only(_lint(_save(tmp_path, [RELU], opset=14), cann="6.0"), "opset").value == "14"
    assert _only(_lint(_save(tmp_path, [RELU], ir=9)), "ir_version").value == "9"
    assert _lint(_save(tmp_path, [RELU], opset=18)) == []


def test_op_outside_the_cann_list(tmp_path):
    nodes = [helper.make_node("Unique", ["x"], ["u"], name="/dedup/Unique"), helper.make_node("Relu", ["u"], ["y"])]
    f = _only(_lint(_save(tmp_path, nodes)), "op")
    assert (f.where, f.value) == ("/dedup/Unique", "Unique") and "cann_onnx_ops_8.0.0.txt" in f.message


def test_op_names_compare_case_insensitively_and_per_version(tmp_path):
    ops = cann_ops(cann_target("7.0"))
    assert {"argmax", "logsoftmax", "cumsum", "layernormalization"} <= ops  # CANN spells Argmax, LogSoftMax
    nodes = [helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], name="/ln", axis=-1)]
    inits = [numpy_helper.from_array(np.ones(8, np.float32), n) for n in ("s", "b")]
    path = _save(tmp_path, nodes, inputs=(("x", [1, 8]),), outputs=(("y", [1, 8]),), opset=17, initializers=inits)
    ok = lint_bundle_files(tmp_path, {"g": _entry(path, (("x", [1, 8]),), (("y", [1, 8]),), None)}, "7.0")
    assert [f.check for f in ok] == ["fp16"] and ok[0].nodes == ("/ln",)
    old = lint_bundle_files(tmp_path, {"g": _entry(path, (("x", [1, 8]),), (("y", [1, 8]),), None)}, "5.0")
    assert {(f.check, f.value) for f in old if f.severity == "error"} == {  # ONNX 1.8 reads IR <= 7
        ("opset", "17"), ("ir_version", "8"), ("op", "LayerNormalization")}


def test_custom_domain(tmp_path):
    nodes = [helper.make_node("FusedMatMul", ["x", "x"], ["y"], name="/attn/FusedMatMul", domain="com.microsoft")]
    findings = _lint(_save(tmp_path, nodes, extra_opsets=[helper.make_opsetid("com.microsoft", 1)]))
    assert {(f.where, f.value) for f in findings if f.check == "domain"} == {
        ("opset_import", "com.microsoft"), ("/attn/FusedMatMul", "com.microsoft::FusedMatMul")}


def test_loop_scan_and_sequences(tmp_path):
    body = helper.make_graph([helper.make_node("Identity", ["c"], ["c_out"])], "body",
                             [helper.make_tensor_value_info(n, t, []) for n, t in
                              (("i", TensorProto.INT64), ("c", TensorProto.BOOL))],
                             [helper.make_tensor_value_info("c_out", TensorProto.BOOL, [])])
    nodes = [helper.make_node("Loop", ["", ""], [], name="/decode/Loop", body=body),
             helper.make_node("SequenceConstruct", ["x"], ["s"], name="/seq/SequenceConstruct"),
             helper.make_node("ConcatFromSequence", ["s"], ["y"], name="/seq/Concat", axis=0)]
    findings = [f for f in _lint(_save(tmp_path, nodes)) if f.check == "control_flow"]
    assert {f.value for f in findings} == {"Loop", "SequenceConstruct", "ConcatFromSequence"}
    assert not [f for f in _lint(_save(tmp_path, nodes)) if f.check == "op"]  # named once, not twice


def test_ops_inside_if_branches_are_checked(tmp_path):
    branch = lambda op: helper.make_graph([helper.make_node(op, ["x"], ["b"], name=f"/if/{op}")], op, [],  # noqa
                                          [_io("b", [1, "seq"])])
    nodes = [helper.make_node("If", ["c"], ["y"], name="/if", then_branch=branch("Relu"), else_branch=branch("Mish"))]
    inits = [numpy_helper.from_array(np.array(True), "c")]
    f = _only(_lint(_save(tmp_path, nodes, initializers=inits)), "op")
    assert (f.where, f.value) == ("/if/Mish", "Mish")


def test_dynamic_dims_must_be_declared_gears(tmp_path):
    path = _save(tmp_path, [RELU])
    findings = _lint(path, gears=({"len": 1}, {"len": 8}))
    assert {(f.check, f.where, f.value) for f in findings if f.severity == "error"} == {
        ("dynamic_dim", "x[1]", "seq"), ("dynamic_dim", "y[1]", "seq")}
    assert all("not a declared gear" in f.message for f in findings if f.severity == "error")
    fixed = _save(tmp_path, [RELU], inputs=(("x", [1, 8]),), outputs=(("y", [1, 8]),), name="fixed")
    assert {(f.where, f.value) for f in _lint(fixed) if f.check == "dynamic_dim"} == {
        ("x[1]", "8 (manifest: gear 'seq')"), ("y[1]", "8 (manifest: gear 'seq')")}
    pinned = _lint(path, inputs=(("x", [1, 8]),), outputs=(("y", [1, 8]),), gears=None)
    assert {(f.severity, f.where) for f in pinned} == {("warning", "x[1]"), ("warning", "y[1]")}
    assert "ATC pins it" in pinned[0].message  # the manifest fixes it, and so will --input_shape
    bare = lint_path(path)
    assert {(f.severity, f.where) for f in bare if f.check == "dynamic_dim"} == {("warning", "x[1]")}
    renamed = _only(_lint(path, inputs=(("pixels", [1, "seq"]),)), "io")
    assert (renamed.where, renamed.value) == ("inputs", "x")


def test_gear_counts_and_values(tmp_path):
    path = _save(tmp_path, [RELU])
    f = _only(_lint(path, gears=({"seq": 1},)), "gears")
    assert (f.where, f.value) == ("gears", "1") and "2..100" in f.message
    assert _only(_lint(path, gears=[{"seq": s} for s in range(1, 102)]), "gears").value == "101"
    assert _only(_lint(path, gears=({"seq": 1}, {"seq": 1}, {"seq": 4})), "gears").where == "gear 1"
    assert _only(_lint(path, gears=({"seq": 1}, {"seq": 0})), "gears").where == "gear 1"
    wide = tuple((f"x{i}", [1, f"d{i}"]) for i in range(5))
    five = _save(tmp_path, [helper.make_node("Sum", [n for n, _ in wide], ["y"])], inputs=wide,
                 outputs=(("y", [1, "d0"]),))
    gears = [{f"d{i}": v for i in range(5)} for v in (1, 2)]
    assert _only(_lint(five, inputs=wide, outputs=(("y", [1, "d0"]),), gears=gears), "gears", "warning").value \
        == "5 dims per gear"
    assert _only(lint_bundle_files(tmp_path, {"g": _entry(five, wide, (("y", [1, "d0"]),), gears)}, "6.0"),
                 "gears").value == "5 dims per gear"


def test_protobuf_size_and_external_data(tmp_path, monkeypatch):
    path = _save(tmp_path, [RELU])
    monkeypatch.setattr(lint, "PROTOBUF_LIMIT", 64)
    f = _only(_lint(path), "size")
    assert f.where == "g.onnx" and "2 GB" in f.message
    monkeypatch.undo()
    w = numpy_helper.from_array(np.ones((1, 1), np.float32), "w")
    ext = _save(tmp_path, [helper.make_node("Add", ["x", "w"], ["y"])], initializers=[w], name="ext")
    model = onnx.load(str(ext))
    onnx.save(model, str(ext), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    assert [f for f in _lint(ext) if f.severity == "error"] == []
    (tmp_path / "ext.onnx.data").unlink()
    assert _only(_lint(ext), "external_data").value == "ext.onnx.data"


def test_fp16_plan_names_the_norm_chain_softmax_and_exp(tmp_path):
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    eps = numpy_helper.from_array(np.array(1e-6, np.float32), "eps")
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"], name="/norm/Pow"),
             helper.make_node("ReduceMean", ["sq"], ["var"], name="/norm/ReduceMean", axes=[-1]),
             helper.make_node("Add", ["var", "eps"], ["ve"], name="/norm/Add"),
             helper.make_node("Sqrt", ["ve"], ["sd"], name="/norm/Sqrt"),
             helper.make_node("Div", ["x", "sd"], ["n"], name="/norm/Div"),
             helper.make_node("Softmax", ["n"], ["p"], name="/attn/Softmax", axis=-1),
             helper.make_node("Exp", ["p"], ["e"], name="/act/Exp"),
             helper.make_node("ReduceSum", ["e"], ["y"], name="/pool/ReduceSum", keepdims=1, axes=[-1])]
    findings = _lint(_save(tmp_path, nodes, outputs=(("y", [1, 1]),), initializers=[two, eps]),
                     outputs=(("y", [1, 1]),))
    assert {f.severity for f in findings} == {"info"}
    assert keep_dtype_plan(findings)["g"] == ["/norm/Pow", "/norm/ReduceMean", "/norm/Add", "/norm/Sqrt",
                                             "/norm/Div", "/attn/Softmax", "/act/Exp", "/pool/ReduceSum"]
    cube = numpy_helper.from_array(np.array(3.0, np.float32), "two")
    plain = _lint(_save(tmp_path, nodes[:2], outputs=(("var", [1, 1]),), initializers=[cube]),
                  outputs=(("var", [1, 1]),))
    assert [(f.where, f.value) for f in plain] == [("/norm/ReduceMean", "ReduceMean")]  # x^3: a plain reduction


def test_lint_cli(tmp_path, tiny_bundle):
    bad = _save(tmp_path, [helper.make_node("Unique", ["x"], ["y"], name="/dedup/Unique")])
    run = lambda *a: run_cli("lint", *a, timeout=120)  # noqa: E731
    r = run(bad)
    assert r.returncode == 1 and "/dedup/Unique" in r.stdout and "Unique" in r.stdout
    assert "1 errors, 1 warnings" in r.stdout  # the op, and x[1] with no gear plan
    r = run(tiny_bundle, "--no-info")
    assert r.returncode == 0 and r.stdout.strip().startswith("0 errors, 0 warnings")
    r = run(tiny_bundle, "--cann", "4.0")
    assert r.returncode == 1 and "unknown CANN version '4.0'" in r.stderr


def test_export_refuses_a_bundle_with_lint_errors(tmp_path, tiny_opts, monkeypatch):
    """An op ATC does not know stops the export (nothing written) unless told to keep going."""
    from vlm2om.exporters.families.minigpt4 import recipe as minigpt4
    from vlm2om.exporters.core.driver import LintFailed, write_bundle

    known = lint.cann_ops(cann_target("7.0"))
    monkeypatch.setattr(lint, "cann_ops", lambda target: known - {"gather"})
    plan = minigpt4.plan(tiny_opts)
    plan.subgraphs = [s for s in plan.subgraphs if s.name == "embed"]  # a Gather-only graph
    lines: list[str] = []
    try:
        write_bundle(plan, tmp_path / "refused", echo=lines.append)
        raise AssertionError("the export should have refused")
    except LintFailed as e:
        assert "embed" in str(e) and "Gather" in str(e)
    assert not (tmp_path / "refused").exists()
    bundle = write_bundle(minigpt4.plan(tiny_opts), tmp_path / "kept", echo=lines.append, keep_going=True)
    assert bundle.manifest["graphs"]["embed"]
    assert any("error" in line and "Gather" in line for line in lines)


def test_export_records_the_keep_dtype_plan(tiny_bundle):
    from vlm2om.runtime.bundle import Bundle

    m = Bundle.open(tiny_bundle).manifest
    plan = m["atc"]["keep_dtype"]
    assert plan.get("decoder_0"), "the RMSNorm/softmax chain of the decoder is kept in fp32"
    assert "--keep_dtype" in m["atc"]["commands"]["decoder_0"]
