"""Cast an fp32 ONNX graph to fp16 for strongly typed TensorRT, keeping chosen fp32 islands.

TensorRT 11 builds strongly typed networks only: precision comes from the graph's types, not from
builder flags. This rewrites the graph with onnx itself: float32 weights and activations become
float16, the engine's inputs/outputs stay float32 (Casts at the boundary), and nodes that need
range or precision (normalisations, the stereo correlation's feature normalisation) stay float32
with Casts around them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compress.errors import ExportError
from compress.export._files import publish, save_onnx, staging_dir
from compress.export.onnx_export import recorded_fp32_nodes

DEFAULT_KEEP_FP32_OPS: tuple[str, ...] = (
    "ReduceL2",
    "ReduceSumSquare",
    "LpNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "InstanceNormalization",
)
"""Ops kept in float32 by default: their sums of squares overflow or lose precision in fp16.
Add "Softmax" for wide softmaxes (e.g. over many disparity levels)."""

# Ops whose output type is set by an attribute we do not rewrite: run them in fp32 and cast after.
_ATTRIBUTE_TYPED_OPS = {"EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                        "Multinomial", "Bernoulli"}
_FP16_MAX = float(np.finfo(np.float16).max)
_FLOAT16_STR = "tensor(float16)"


@dataclass
class Fp16CastReport:
    """What cast_onnx_fp16 did."""

    path: Path
    kept_fp32_nodes: list[str] = field(default_factory=list)
    casts_inserted: int = 0
    converted_initializers: int = 0


def _has_subgraph(graph: onnx.GraphProto) -> str | None:
    for node in graph.node:
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                return node.name or node.op_type
    return None


def _to_fp16_array(array: np.ndarray) -> np.ndarray:
    # Clip finite values into fp16 range so large constants (masks, bounds) do not become inf.
    finite = np.isfinite(array)
    clipped = np.where(finite, np.clip(array, -_FP16_MAX, _FP16_MAX), array)
    return clipped.astype(np.float16)


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Float Constant nodes become initializers, so they get an fp16 and an fp32 copy like weights."""
    kept = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1:
            attr = node.attribute[0]
            if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                tensor = onnx.TensorProto()
                tensor.CopyFrom(attr.t)
                tensor.name = node.output[0]
                graph.initializer.append(tensor)
                continue
            if attr.name in ("value_float", "value_floats"):
                values = np.array(attr.f if attr.name == "value_float" else list(attr.floats), dtype=np.float32)
                graph.initializer.append(numpy_helper.from_array(values, node.output[0]))
                continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def is_fp32_island(node: onnx.NodeProto, keep_ops: set[str] | tuple[str, ...],
                   keep_patterns: tuple[str, ...]) -> bool:
    """Whether a node is kept in float32: its op is listed or its name matches a pattern (fnmatch)."""
    return node.op_type in keep_ops or any(fnmatchcase(node.name, p) for p in keep_patterns)


def fp32_island_names(
    model_or_path: onnx.ModelProto | str | os.PathLike,
    keep_fp32_ops: tuple[str, ...] | list[str] = DEFAULT_KEEP_FP32_OPS,
    keep_fp32_nodes: tuple[str, ...] | list[str] | None = None,
) -> list[str]:
    """Names of the (top-level) nodes cast_onnx_fp16 would keep in float32 (same keep_fp32_nodes default)."""
    model = model_or_path
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model_or_path), load_external_data=False)
    patterns = recorded_fp32_nodes(model) if keep_fp32_nodes is None else tuple(keep_fp32_nodes)
    return [n.name for n in model.graph.node if n.name and is_fp32_island(n, tuple(keep_fp32_ops), patterns)]


class _Rewriter:
    """Walks the nodes in order and emits the fp16 graph, inserting Casts where domains meet."""

    def __init__(self, model: onnx.ModelProto, keep_ops: set[str], keep_patterns: tuple[str, ...]) -> None:
        self.graph = model.graph
        self.opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 17)
        self.keep_ops = keep_ops
        self.keep_patterns = keep_patterns
        self.elem: dict[str, int] = {}
        for vi in list(self.graph.input) + list(self.graph.output) + list(self.graph.value_info):
            if vi.type.HasField("tensor_type"):
                self.elem[vi.name] = vi.type.tensor_type.elem_type
        self.inits = {i.name: i for i in self.graph.initializer}
        for name, init in self.inits.items():
            self.elem[name] = init.data_type
        self.graph_outputs = {o.name for o in self.graph.output}
        # Per original float32 tensor: the name of its fp16 and/or fp32 version.
        self.versions: dict[str, dict[str, str]] = {
            i.name: {"fp32": i.name} for i in self.graph.input if i.name not in self.inits
        }
        self.init_wants: dict[str, set[str]] = {}
        self.nodes: list[onnx.NodeProto] = []
        self.casts = 0
        self.kept: list[str] = []

    def is_float(self, name: str) -> bool:
        return bool(name) and self.elem.get(name) == TensorProto.FLOAT

    def keep(self, node: onnx.NodeProto) -> bool:
        return (
            is_fp32_island(node, self.keep_ops, self.keep_patterns)
            or node.op_type in _ATTRIBUTE_TYPED_OPS
            or node.domain not in ("", "ai.onnx")
        )

    def get(self, name: str, want: str) -> str:
        """Name of tensor `name` in precision `want` ("fp16"/"fp32"), casting once if needed."""
        if not self.is_float(name):
            return name
        if name in self.inits:
            self.init_wants.setdefault(name, set()).add(want)
            return name if want == "fp16" else f"{name}__fp32"
        have = self.versions.get(name)
        if have is None:
            raise ExportError(f"tensor '{name}' is used before it is produced; the graph is not topologically "
                              "sorted (run onnx.checker / onnxslim on it first)")
        if want not in have:
            source = next(iter(have.values()))
            target = name if (want == "fp32" and name in self.graph_outputs) else f"{name}__{want}"
            to = TensorProto.FLOAT16 if want == "fp16" else TensorProto.FLOAT
            self.nodes.append(helper.make_node("Cast", [source], [target], to=to, name=f"{target}__cast"))
            self.casts += 1
            have[want] = target
        return have[want]

    def _formal(self, schema: onnx.defs.OpSchema, params: list, index: int) -> str | None:
        if not params:
            return None
        formal = params[min(index, len(params) - 1)]
        if index >= len(params) and formal.option != onnx.defs.OpSchema.FormalParameterOption.Variadic:
            return None
        for constraint in schema.type_constraints:
            if constraint.type_param_str == formal.type_str:
                return "fp16" if _FLOAT16_STR in constraint.allowed_type_strs else "fp32"
        return "fp16" if formal.type_str == _FLOAT16_STR else "fp32"

    def emit(self, node: onnx.NodeProto) -> None:
        if self.keep(node):
            self._emit_fp32(node)
            return
        try:
            schema = onnx.defs.get_schema(node.op_type, self.opset, node.domain)
        except onnx.defs.SchemaError:
            self._emit_fp32(node)
            return
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for i, name in enumerate(node.input):
            want = self._formal(schema, list(schema.inputs), i) or "fp32"
            new.input[i] = self.get(name, want)
        for i, name in enumerate(node.output):
            if not self.is_float(name):
                continue
            precision = self._formal(schema, list(schema.outputs), i) or "fp32"
            if node.op_type == "Cast":
                precision = "fp16"
            out = name if precision == "fp32" or name not in self.graph_outputs else f"{name}__fp16"
            new.output[i] = out
            self.versions[name] = {precision: out}
        self._retype_attributes(new)
        self.nodes.append(new)

    def _emit_fp32(self, node: onnx.NodeProto) -> None:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for i, name in enumerate(node.input):
            new.input[i] = self.get(name, "fp32")
        for name in node.output:
            if self.is_float(name):
                self.versions[name] = {"fp32": name}
        self.kept.append(node.name or node.op_type)
        self.nodes.append(new)

    def _retype_attributes(self, node: onnx.NodeProto) -> None:
        if node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i == TensorProto.FLOAT:
                    attr.i = TensorProto.FLOAT16
        elif node.op_type == "ConstantOfShape" and self.is_float(self._orig_output(node)):
            value = next((a for a in node.attribute if a.name == "value"), None)
            array = numpy_helper.to_array(value.t) if value is not None else np.zeros(1, np.float32)
            tensor = numpy_helper.from_array(_to_fp16_array(array.astype(np.float32)))
            node.ClearField("attribute")
            node.attribute.append(helper.make_attribute("value", tensor))

    def _orig_output(self, node: onnx.NodeProto) -> str:
        out = node.output[0]
        return out[: -len("__fp16")] if out.endswith("__fp16") else out

    def finish(self) -> int:
        """Cast graph outputs back to fp32, rewrite initializers; returns how many became fp16."""
        for name in self.graph_outputs:
            if self.is_float(name) and name not in self.inits:
                self.get(name, "fp32")
        converted = 0
        new_inits = []
        for name, init in self.inits.items():
            wants = self.init_wants.get(name, set())
            if "fp32" in wants:
                copy = onnx.TensorProto()
                copy.CopyFrom(init)
                copy.name = f"{name}__fp32"
                new_inits.append(copy)
            if "fp16" in wants:
                array = numpy_helper.to_array(init)
                new_inits.append(numpy_helper.from_array(_to_fp16_array(array), name))
                converted += 1
            elif not wants:
                new_inits.append(init)
        del self.graph.initializer[:]
        self.graph.initializer.extend(new_inits)
        del self.graph.node[:]
        self.graph.node.extend(self.nodes)
        return converted


def cast_onnx_fp16(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    keep_fp32_ops: tuple[str, ...] | list[str] = DEFAULT_KEEP_FP32_OPS,
    keep_fp32_nodes: tuple[str, ...] | list[str] | None = None,
) -> Fp16CastReport:
    """Write an fp16 copy of the ONNX model src to dst with float32 I/O and float32 islands.

    keep_fp32_nodes are shell-style patterns (fnmatch, case-sensitive) over node names, e.g.
    "*/corr/*" for every node the exporter named under a module called corr. None (the default) means
    the patterns to_onnx recorded for the model's float32 modules (its correlation normalisation).
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ExportError(f"ONNX file {src} does not exist; export the model first (to_onnx)")
    model = onnx.load(str(src))
    if keep_fp32_nodes is None:
        keep_fp32_nodes = recorded_fp32_nodes(model)
    where = _has_subgraph(model.graph)
    if where is not None:
        raise ExportError(f"node '{where}' holds a control-flow subgraph; fp16 casting needs a flat graph: export "
                          "with a fixed iteration count so loops unroll")
    _constants_to_initializers(model.graph)
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as err:
        raise ExportError(f"ONNX shape inference failed on {src}: {err}; run onnx.checker on the model") from err
    untyped = [o for n in model.graph.node for o in n.output if o and o not in
               {vi.name for vi in list(model.graph.value_info) + list(model.graph.output)}]
    if untyped:
        raise ExportError(f"shape inference could not type {len(untyped)} tensors (first: '{untyped[0]}'); "
                          "simplify the model (onnxslim) so every tensor has a known type before casting")

    rewriter = _Rewriter(model, set(keep_fp32_ops), tuple(keep_fp32_nodes))
    for node in model.graph.node:
        rewriter.emit(node)
    converted = rewriter.finish()
    # Old intermediate types are stale; let shape inference recompute them from the new graph.
    del model.graph.value_info[:]
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        onnx.checker.check_model(model)
    except Exception as err:
        raise ExportError(f"the fp16 graph of {src} is not valid ONNX ({err}); keep the offending node in fp32 "
                          "with keep_fp32_nodes") from err
    with staging_dir(dst) as stage:
        publish(save_onnx(model, stage / dst.name), dst)
    return Fp16CastReport(path=dst, kept_fp32_nodes=rewriter.kept, casts_inserted=rewriter.casts,
                          converted_initializers=converted)
