"""TensorRT support lint: find what TensorRT's ONNX parser will reject before trying to build an engine."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

# Operators marked supported ("Y") in the ONNX-TensorRT operator support matrix for TensorRT 10
# (onnx-tensorrt docs/operators.md, 10.x releases). The one list the lint checks against; update it
# here when moving to a newer TensorRT.
TRT10_SUPPORTED_OPS: frozenset[str] = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike
    Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
    DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
    GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
    GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf
    IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
    MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not
    OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
    RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
    ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round
    ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
    Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
    Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)
"""ONNX operators (default domain) TensorRT 10's ONNX parser imports."""

TRT10_OPSET_RANGE: tuple[int, int] = (9, 20)
"""Default-domain opsets TensorRT 10.0's parser documents as supported (inclusive)."""

_UNSUPPORTED_DTYPES: dict[int, str] = {
    TensorProto.DOUBLE: "float64",
    TensorProto.COMPLEX64: "complex64",
    TensorProto.COMPLEX128: "complex128",
    TensorProto.STRING: "string",
}

_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class LintFinding:
    """One problem TensorRT would have with a node of the graph."""

    severity: str
    """"error" (the build would fail or be wrong), "warning" (works but slow or fragile), "info"."""
    code: str
    """Stable identifier: grid_sample_5d, unsupported_op, custom_op, unsupported_dtype, int64, control_flow,
    opset."""
    node: str
    """Node name (or "<op_type #index>" for unnamed nodes); empty for graph-level findings."""
    op_type: str
    detail: str
    """The offending input/output, its shape or dtype, and what to do about it."""

    def __str__(self) -> str:
        where = f"node '{self.node}' ({self.op_type})" if self.node else "graph"
        return f"[{self.severity}] {self.code} at {where}: {self.detail}"


def _load(model_or_path: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    # Weights are not needed to lint; skipping them keeps multi-GB models cheap.
    return onnx.load(str(Path(model_or_path)), load_external_data=False)


def _walk(graph: onnx.GraphProto, prefix: str = "") -> Iterator[tuple[str, onnx.NodeProto, int]]:
    """Every node, subgraphs included, with a display name."""
    for index, node in enumerate(graph.node):
        name = node.name or f"<{node.op_type} #{index}>"
        yield prefix + name, node, index
        for attr in node.attribute:
            subgraphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
            for sub in subgraphs:
                yield from _walk(sub, prefix=f"{prefix}{name}/{attr.name}:")


def _value_types(graph: onnx.GraphProto, out: dict[str, onnx.TypeProto] | None = None) -> dict[str, onnx.TypeProto]:
    out = {} if out is None else out
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        out[vi.name] = vi.type
    for init in graph.initializer:
        t = onnx.TypeProto()
        t.tensor_type.elem_type = init.data_type
        for d in init.dims:
            t.tensor_type.shape.dim.add().dim_value = d
        out[init.name] = t
    for node in graph.node:
        for attr in node.attribute:
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                _value_types(sub, out)
    return out


def _shape_str(t: onnx.TypeProto | None) -> str:
    if t is None or not t.tensor_type.HasField("shape"):
        return "?"
    dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in t.tensor_type.shape.dim]
    return "[" + ", ".join(dims) + "]"


def _rank(t: onnx.TypeProto | None) -> int | None:
    if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    return len(t.tensor_type.shape.dim)


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    names = {init.name for init in graph.initializer}
    names.update(o for n in graph.node if n.op_type == "Constant" for o in n.output)
    return names


def lint_onnx(model_or_path: onnx.ModelProto | str | os.PathLike) -> list[LintFinding]:
    """Report every node TensorRT 10 cannot parse or run well: rank-5 GridSample, unsupported ops/dtypes,
    dynamic control flow."""
    model = _load(model_or_path)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # lint still works from the declared types when inference fails
        inferred = model
    types = _value_types(inferred.graph)
    constants = _constant_names(inferred.graph)
    findings: list[LintFinding] = []

    for imp in model.opset_import:
        lo, hi = TRT10_OPSET_RANGE
        if imp.domain in _DEFAULT_DOMAINS and not lo <= imp.version <= hi:
            findings.append(LintFinding(
                "warning", "opset", "", "", f"default-domain opset {imp.version} is outside TensorRT 10.0's "
                f"documented range {lo}..{hi}; export with an opset in that range"))

    int64_tensors: list[tuple[str, str, str]] = []
    for name, node, _ in _walk(inferred.graph):
        findings.extend(_check_op(name, node, types))
        findings.extend(_check_dtypes(name, node, types, int64_tensors))
        findings.extend(_check_control_flow(name, node, constants))

    if int64_tensors:
        node, op_type, tensor = int64_tensors[0]
        findings.append(LintFinding(
            "info", "int64", node, op_type, f"{len(int64_tensors)} int64 tensors (first: '{tensor}'); TensorRT runs "
            "shape arithmetic in int64 but may cast int64 weights/values to int32, which is fine below 2**31"))
    return findings


def _check_op(name: str, node: onnx.NodeProto, types: dict[str, onnx.TypeProto]) -> list[LintFinding]:
    if node.domain not in _DEFAULT_DOMAINS:
        return [LintFinding("error", "custom_op", name, node.op_type,
                            f"operator from domain '{node.domain}' needs a TensorRT plugin; rewrite it with "
                            "standard ONNX operators")]
    if node.op_type not in TRT10_SUPPORTED_OPS:
        return [LintFinding("error", "unsupported_op", name, node.op_type,
                            f"'{node.op_type}' is not in TensorRT 10's ONNX operator support matrix; replace the "
                            "PyTorch op that produced it")]
    if node.op_type == "GridSample":
        found = []
        for role, tensor in zip(("X", "grid"), node.input, strict=False):
            rank = _rank(types.get(tensor))
            if rank is not None and rank != 4:
                found.append(LintFinding(
                    "error", "grid_sample_5d" if rank == 5 else "grid_sample_rank", name, node.op_type,
                    f"input {role} '{tensor}' has rank {rank} {_shape_str(types.get(tensor))}; TensorRT runs "
                    "only 4-D GridSample: fold the extra dimension into the batch or channels"))
            elif rank is None:
                found.append(LintFinding(
                    "warning", "grid_sample_rank", name, node.op_type,
                    f"rank of input {role} '{tensor}' is unknown; TensorRT needs it 4-D"))
        return found
    return []


def _check_dtypes(
    name: str, node: onnx.NodeProto, types: dict[str, onnx.TypeProto], int64_tensors: list[tuple[str, str, str]]
) -> list[LintFinding]:
    found = []
    for tensor in list(node.input) + list(node.output):
        t = types.get(tensor)
        if not tensor or t is None or not t.HasField("tensor_type"):
            continue
        elem = t.tensor_type.elem_type
        if elem in _UNSUPPORTED_DTYPES:
            found.append(LintFinding(
                "error", "unsupported_dtype", name, node.op_type,
                f"tensor '{tensor}' is {_UNSUPPORTED_DTYPES[elem]} {_shape_str(t)}; TensorRT has no such type in "
                "strongly typed networks: keep the model in float32 (no .double()/complex ops)"))
        elif elem == TensorProto.INT64:
            int64_tensors.append((name, node.op_type, tensor))
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i in _UNSUPPORTED_DTYPES:
            found.append(LintFinding(
                "error", "unsupported_dtype", name, node.op_type,
                f"casts to {_UNSUPPORTED_DTYPES[attr.i]}; remove the cast"))
    return found


def _check_control_flow(name: str, node: onnx.NodeProto, constants: set[str]) -> list[LintFinding]:
    if node.op_type == "If":
        cond = node.input[0]
        if cond in constants:
            return [LintFinding("warning", "control_flow", name, node.op_type,
                                f"If on constant condition '{cond}'; simplify the graph (onnxslim) to fold it")]
        return [LintFinding("error", "control_flow", name, node.op_type,
                            f"If on data-dependent condition '{cond}'; make the branch a Python-time decision "
                            "(config value), not a tensor value")]
    if node.op_type in ("Loop", "Scan"):
        dynamic = [t for t in node.input[:2] if t and t not in constants] if node.op_type == "Loop" else []
        if dynamic:
            return [LintFinding("error", "control_flow", name, node.op_type,
                                f"Loop with non-constant trip count/condition {dynamic}; fix the iteration "
                                "count at export time so the loop unrolls")]
        return [LintFinding("warning", "control_flow", name, node.op_type,
                            f"{node.op_type} with a fixed trip count; unrolling it (trace with a fixed iters) "
                            "lets TensorRT fuse across iterations")]
    return []
