"""TensorRT support lint on hand-built ONNX graphs and on the toy stereo model's export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compress.export import TRT10_SUPPORTED_OPS, LintFinding, lint_onnx, to_onnx
from tests.stereo_toy import make_toy


def _model(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def _by_code(findings: list[LintFinding], code: str) -> list[LintFinding]:
    return [f for f in findings if f.code == code]


def test_rank5_grid_sample_found_with_node_name() -> None:
    model = _model(
        [helper.make_node("GridSample", ["vol", "grid"], ["out"], name="lookup3d", align_corners=1)],
        [helper.make_tensor_value_info("vol", TensorProto.FLOAT, [1, 2, 4, 8, 8]),
         helper.make_tensor_value_info("grid", TensorProto.FLOAT, [1, 4, 8, 8, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, 4, 8, 8])],
        opset=20,
    )
    found = _by_code(lint_onnx(model), "grid_sample_5d")
    assert {(f.node, f.severity, f.op_type) for f in found} == {("lookup3d", "error", "GridSample")}
    assert any("'vol'" in f.detail and "[1, 2, 4, 8, 8]" in f.detail for f in found)


def test_rank4_grid_sample_is_clean() -> None:
    model = _model(
        [helper.make_node("GridSample", ["img", "grid"], ["out"], name="lookup2d")],
        [helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 2, 8, 8]),
         helper.make_tensor_value_info("grid", TensorProto.FLOAT, [1, 8, 8, 2])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, 8, 8])],
    )
    assert lint_onnx(model) == []


def test_float64_tensor_found_with_node_name() -> None:
    weights = numpy_helper.from_array(np.ones((2,), dtype=np.float64), "w64")
    model = _model(
        [helper.make_node("Cast", ["x"], ["x64"], name="to_double", to=TensorProto.DOUBLE),
         helper.make_node("Mul", ["x64", "w64"], ["y64"], name="scale64"),
         helper.make_node("Cast", ["y64"], ["y"], name="to_float", to=TensorProto.FLOAT)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        initializers=[weights],
    )
    found = _by_code(lint_onnx(model), "unsupported_dtype")
    assert {f.node for f in found} == {"to_double", "scale64", "to_float"}
    assert all(f.severity == "error" for f in found)
    assert any(f.node == "scale64" and "'w64'" in f.detail and "float64" in f.detail for f in found)


def test_unsupported_and_custom_ops_found() -> None:
    assert "Unique" not in TRT10_SUPPORTED_OPS
    model = _model(
        [helper.make_node("Unique", ["x"], ["u"], name="dedupe"),
         helper.make_node("Relu", ["x"], ["r"], name="act")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("u", TensorProto.FLOAT, ["n"]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, [4])],
    )
    found = lint_onnx(model)
    assert [(f.code, f.node, f.op_type) for f in found] == [("unsupported_op", "dedupe", "Unique")]

    graph = helper.make_graph(
        [helper.make_node("FusedThing", ["x"], ["y"], name="vendor_op", domain="com.example")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    custom = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                     helper.make_opsetid("com.example", 1)])
    assert [(f.code, f.node) for f in lint_onnx(custom)] == [("custom_op", "vendor_op")]


def _if_model(cond_constant: bool) -> onnx.ModelProto:
    def branch(name: str, value: float) -> onnx.GraphProto:
        const = helper.make_node("Constant", [], [f"{name}_out"],
                                 value=numpy_helper.from_array(np.array([value], np.float32)))
        return helper.make_graph([const], name, [],
                                 [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1])])

    nodes = []
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])]
    if cond_constant:
        nodes.append(helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True))))
    else:
        nodes.append(helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0))
        nodes.append(helper.make_node("Greater", ["s", "zero"], ["cond"], name="positive"))
    nodes.append(helper.make_node("If", ["cond"], ["y"], name="choose",
                                  then_branch=branch("then", 1.0), else_branch=branch("else", 2.0)))
    inits = [] if cond_constant else [numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    return _model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], inits)


def test_control_flow_severity_depends_on_condition() -> None:
    dynamic = _by_code(lint_onnx(_if_model(cond_constant=False)), "control_flow")
    assert [(f.node, f.severity) for f in dynamic] == [("choose", "error")]
    constant = _by_code(lint_onnx(_if_model(cond_constant=True)), "control_flow")
    assert [(f.node, f.severity) for f in constant] == [("choose", "warning")]


def test_loop_with_dynamic_trip_count_is_an_error() -> None:
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["acc_in", "acc_in"], ["acc_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1])])
    model = _model(
        [helper.make_node("Loop", ["n", "", "x"], ["y"], name="refine", body=body)],
        [helper.make_tensor_value_info("n", TensorProto.INT64, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    found = _by_code(lint_onnx(model), "control_flow")
    assert [(f.node, f.severity, f.op_type) for f in found] == [("refine", "error", "Loop")]
    assert "'n'" in found[0].detail


def test_opset_outside_trt10_range_warns() -> None:
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="act")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], opset=22)
    assert [(f.code, f.severity) for f in lint_onnx(model)] == [("opset", "warning")]


def test_toy_stereo_export_is_clean(tmp_path: Path) -> None:
    report = to_onnx(make_toy(), tmp_path / "toy.onnx", 32, 64, iters=2, check_parity=False)
    findings = lint_onnx(report.path)
    assert [f for f in findings if f.severity != "info"] == []
    assert findings == report.lint
    assert {n.op_type for n in onnx.load(str(report.path)).graph.node} <= TRT10_SUPPORTED_OPS


def test_lint_reads_paths_without_weights(tmp_path: Path) -> None:
    model = _model([helper.make_node("Unique", ["x"], ["u"], name="dedupe")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                   [helper.make_tensor_value_info("u", TensorProto.FLOAT, ["n"])])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert [f.node for f in lint_onnx(path)] == ["dedupe"]
    assert "dedupe" in str(lint_onnx(str(path))[0])


@pytest.mark.parametrize("op", ["Conv", "GridSample", "Softmax", "Resize", "ReduceL2", "Pad", "Einsum"])
def test_supported_list_has_the_family_ops(op: str) -> None:
    assert op in TRT10_SUPPORTED_OPS
