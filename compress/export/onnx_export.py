"""Export a stereo model to ONNX with checker, onnxslim, TensorRT lint and ONNX Runtime parity.

Exporter choice: the TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`). The
dynamo exporter, torch's default since 2.9, needs the `onnxscript` package, which is not an ffsc
dependency. The TorchScript exporter traces the fixed-iteration forward into a flat graph (loop
unrolled, 4-D GridSample, dynamic H/W/batch through `dynamic_axes`) that ONNX Runtime runs within
1e-5 px of PyTorch on this model family. `dynamo=True` stays available once onnxscript is installed.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from compress.errors import ConfigError, ExportError, MissingDependencyError
from compress.export._files import publish, save_onnx, staging_dir
from compress.export.runtime import INPUT_NAMES, METADATA_PREFIX, OUTPUT_NAME, make_session, random_stereo_pair
from compress.export.trt_lint import LintFinding, lint_onnx
from teacher.layers import Float32Island


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, shape (ints, or names for dynamic dims) and element type."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str


@dataclass
class ExportReport:
    """Result of to_onnx."""

    path: Path
    opset: int
    iters: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_abs_diff: float | None
    """Largest |ONNX Runtime - PyTorch| disparity difference over the parity checks (None if skipped)."""
    onnx_bytes: int
    """Size of the .onnx file plus its external data file, if any."""
    node_count: int
    lint: list[LintFinding] = field(default_factory=list)
    seconds: float = 0.0
    exporter: str = "torchscript"
    keep_fp32_nodes: list[str] = field(default_factory=list)
    """Node-name patterns of the model's float32 islands, stored in the ONNX for fp16 casting."""


class DeployWrapper(nn.Module):
    """(left, right) -> disp with the iteration count fixed and test_mode on: the deployed signature."""

    def __init__(self, model: nn.Module, iters: int) -> None:
        super().__init__()
        self.model = model
        self.iters = iters

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """Final full-resolution disparity, B x 1 x H x W."""
        return self.model(left, right, iters=self.iters, test_mode=True)


def ffsc_version() -> str:
    """Installed ffsc version, or "unknown" when running from an uninstalled checkout."""
    try:
        return metadata.version("ffsc")
    except metadata.PackageNotFoundError:
        return "unknown"


def _scope_pattern(qualname: str) -> str:
    """fnmatch pattern over the TorchScript exporter's node names for the nodes a module emits."""
    parts = qualname.split(".")
    if not any(p.isdigit() for p in parts):
        return "/" + "/".join(parts) + "/*"
    # Container items are scoped "<container>.<index>" with inconsistent nesting: match the innermost level.
    leaf = f"{parts[-2]}.{parts[-1]}" if parts[-1].isdigit() else parts[-1]
    return f"*/{leaf}/*"


def fp32_node_patterns(module: nn.Module, prefix: str = "") -> list[str]:
    """Node-name patterns of every :class:`teacher.layers.Float32Island` inside module (TorchScript exporter).

    These are the computations the model runs in float32 under autocast (the correlation normalisation);
    to_onnx stores the patterns in the ONNX so fp16 casting and engine building keep the same nodes float32.
    """
    names = [f"{prefix}.{name}" if prefix else name for name, m in module.named_modules()
             if isinstance(m, Float32Island) and name]
    return sorted({_scope_pattern(name) for name in names})


def check_image_size(height: int, width: int) -> None:
    """Raise ConfigError unless height and width are positive multiples of 32 (the family's stride)."""
    if height <= 0 or width <= 0 or height % 32 or width % 32:
        raise ConfigError(f"image size {height}x{width} is not allowed; height and width must be positive "
                          "multiples of 32 (e.g. 480x640)")


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return None


def _tensor_specs(values) -> list[TensorSpec]:
    specs = []
    for vi in values:
        tt = vi.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim)
        specs.append(TensorSpec(vi.name, shape, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name))
    return specs


def _check_output(disp: object, batch: int, height: int, width: int) -> None:
    if not isinstance(disp, torch.Tensor) or tuple(disp.shape) != (batch, 1, height, width):
        got = tuple(disp.shape) if isinstance(disp, torch.Tensor) else type(disp).__name__
        raise ExportError(f"model(left, right, iters=..., test_mode=True) returned {got}; expected a tensor of "
                          f"shape {(batch, 1, height, width)} (B x 1 x H x W disparity)")


def _torch_export(
    wrapper: nn.Module, args: tuple[torch.Tensor, ...], dest: Path, opset: int, dynamic: bool, dynamo: bool,
    input_names: tuple[str, ...] = INPUT_NAMES, output_names: tuple[str, ...] | None = (OUTPUT_NAME,),
) -> None:
    dims = {0: "batch", 2: "height", 3: "width"}
    names = [*input_names, *(output_names or ())]
    kwargs: dict = dict(opset_version=opset, input_names=list(input_names))
    if output_names is not None:
        kwargs["output_names"] = list(output_names)
    if dynamo:
        try:
            import onnxscript  # noqa: F401  (the dynamo exporter's hard dependency)
        except ImportError as err:
            raise MissingDependencyError("the dynamo ONNX exporter needs `pip install onnxscript`; or export "
                                         "with dynamo=False (the default)") from err
        if dynamic:
            batch, h, w = torch.export.Dim("batch"), torch.export.Dim("height"), torch.export.Dim("width")
            spec = {0: batch, 2: h, 3: w}
            kwargs["dynamic_shapes"] = {"left": spec, "right": spec}
    else:
        kwargs["do_constant_folding"] = True
        if dynamic:
            kwargs["dynamic_axes"] = {name: dims for name in names}
    with warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (module docstring); its notices are noise here.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*Constant folding.*")
        # Shape checks in the model family trace as constants, and InstanceNorm always uses input statistics;
        # the parity check, not these notices, decides whether the trace is right.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*instance_norm.*")
        try:
            # No autograd while tracing: parameters require grad, and saved activations would multiply the
            # exporter's memory (GBs for a 480x640 cost volume).
            with torch.no_grad():
                torch.onnx.export(wrapper, args, str(dest), dynamo=dynamo, **kwargs)
        except Exception as err:
            raise ExportError(f"torch.onnx.export failed for {type(getattr(wrapper, 'model', wrapper)).__name__}: "
                              f"{type(err).__name__}: {err}. The forward must be traceable: no data-dependent "
                              "Python control flow, no .item()/.cpu() on the hot path") from err


def _slim(model: onnx.ModelProto) -> onnx.ModelProto:
    # onnxslim takes about 2 s to import and only a slimmed export uses it
    import onnxslim

    try:
        return onnxslim.slim(model)
    except Exception as err:
        raise ExportError(f"onnxslim failed to simplify the graph ({err}); retry with simplify=False") from err


def export_module(module: nn.Module, inputs: tuple[torch.Tensor, ...], dest: str | os.PathLike,
                  opset: int = 17) -> list[str]:
    """ONNX of any traceable module on fixed inputs named x0, x1, ... (the exporter and onnxslim to_onnx uses,
    without parity or metadata: a part of a model timed alone); returns the graph's input names."""
    dest = Path(dest)
    names = tuple(f"x{i}" for i in range(len(inputs)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notices about shape-dependent Python values are expected here
        _torch_export(module, inputs, dest, opset, dynamic=False, dynamo=False, input_names=names, output_names=None)
    proto = _slim(onnx.load(str(dest)))
    onnx.save_model(proto, str(dest))
    return [i.name for i in proto.graph.input]


def _set_metadata(model: onnx.ModelProto, values: dict[str, object]) -> None:
    keep = [p for p in model.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in values.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = METADATA_PREFIX + key, str(value)


def load_graph(path: str | os.PathLike) -> onnx.ModelProto:
    """An ONNX model without its external weights; one ExportError for a damaged file."""
    # protobuf comes with onnx; only a damaged file's error needs its DecodeError
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(path), load_external_data=False)
    except DecodeError as err:  # a damaged or foreign file: one line, not the protobuf traceback
        raise ExportError(f"{path} is not a readable ONNX model ({err}); re-export it with `ffsc export`") from None


def read_metadata(model_or_path: onnx.ModelProto | str | os.PathLike) -> dict[str, str]:
    """The ffsc.* metadata to_onnx stored (iters, height, width, dynamic, version, keep_fp32_nodes), prefix
    stripped."""
    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else load_graph(model_or_path)
    n = len(METADATA_PREFIX)
    return {p.key[n:]: p.value for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)}


NOT_FFSC = "was not exported by ffsc (no ffsc metadata)"
"""Said once of an ONNX model from elsewhere, with what is assumed or needed in its place."""
STEREO_IO = ("ffsc runs ONNX stereo models with inputs 'left' and 'right' (B x 3 x H x W, RGB 0..255) and an output "
             "'disp' (B x 1 x H x W)")


def exported_by_ffsc(meta: dict[str, str]) -> bool:
    """Whether read_metadata found what to_onnx records (it always records the ffsc version)."""
    return "version" in meta


def static_input_size(model: onnx.ModelProto) -> tuple[int, int] | None:
    """The graph's fixed input (height, width); None when either is dynamic."""
    dims = [d.dim_value if d.HasField("dim_value") else None for d in model.graph.input[0].type.tensor_type.shape.dim]
    return (dims[2], dims[3]) if len(dims) == 4 and dims[2] and dims[3] else None


def check_stereo_onnx(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """The graph has the inputs and output ffsc feeds and reads (an ONNX model from elsewhere may not)."""
    weights = {init.name for init in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in weights]
    outputs = [o.name for o in model.graph.output]
    if inputs and set(inputs) <= set(INPUT_NAMES) and OUTPUT_NAME in outputs:
        return
    origin = "" if exported_by_ffsc(read_metadata(model)) else f" {NOT_FFSC} and"
    raise ExportError(f"{path}{origin} has inputs {inputs} and outputs {outputs}; {STEREO_IO}")


def check_onnx_size(path: str | os.PathLike, height: int, width: int) -> None:
    """An ONNX model with a static input size is asked for exactly that size (ONNX Runtime fails mid-run otherwise)."""
    size = static_input_size(load_graph(path))
    if size is not None and size != (height, width):
        raise ConfigError(f"{path} takes only {size[0]}x{size[1]} (height x width) inputs (a static shape), but "
                          f"{height}x{width} was asked; pass --height {size[0]} --width {size[1]}")


def _unmatched_patterns(model: onnx.ModelProto, patterns: list[str]) -> list[LintFinding]:
    names = [n.name for n in model.graph.node]
    return [LintFinding("warning", "fp32_island", "", "", f"float32-island pattern '{p}' matches no node, so an "
                        "fp16 cast will not keep that module in float32 (was it called by the forward?)")
            for p in patterns if not any(fnmatchcase(n, p) for n in names)]


def recorded_fp32_nodes(model_or_path: onnx.ModelProto | str | os.PathLike) -> tuple[str, ...]:
    """The float32-island node patterns to_onnx stored in an ONNX model (empty for other models)."""
    value = read_metadata(model_or_path).get("keep_fp32_nodes")
    if not value:
        return ()
    try:
        patterns = json.loads(value)
    except json.JSONDecodeError as err:
        raise ExportError(f"metadata ffsc.keep_fp32_nodes is not a JSON list ({err}); re-export the model") from err
    return tuple(str(p) for p in patterns)


def _parity(
    wrapper: nn.Module, onnx_path: Path, device: torch.device, shapes: list[tuple[int, int, int]], tolerance: float
) -> float:
    session = make_session(onnx_path, device)
    worst = 0.0
    for seed, (batch, height, width) in enumerate(shapes, start=1):
        left, right = random_stereo_pair(batch, height, width, seed=seed, device=device)
        with torch.no_grad():
            expected = wrapper(left, right).float().cpu().numpy()
        try:
            (got,) = session.run([OUTPUT_NAME], {INPUT_NAMES[0]: left.cpu().numpy(),
                                                 INPUT_NAMES[1]: right.cpu().numpy()})
        except Exception as err:
            raise ExportError(f"ONNX Runtime failed to run the exported model at {batch}x3x{height}x{width}: "
                              f"{err}") from err
        if not (np.isfinite(got).all() and np.isfinite(expected).all()):
            raise ExportError(f"non-finite disparity at {batch}x3x{height}x{width} (ONNX finite: "
                              f"{bool(np.isfinite(got).all())}, PyTorch finite: {bool(np.isfinite(expected).all())})")
        diff = float(np.max(np.abs(got - expected)))
        worst = max(worst, diff)
        if diff > tolerance:
            raise ExportError(f"ONNX Runtime output differs from PyTorch by max abs diff {diff:.4g} px at "
                              f"{batch}x3x{height}x{width} (tolerance {tolerance:g}); the traced graph does not "
                              "match the eager model: look for Python-side state or data-dependent branches")
    return worst


def to_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    height: int,
    width: int,
    iters: int,
    opset: int = 17,
    dynamic: bool = False,
    simplify: bool = True,
    check_parity: bool = True,
    tolerance: float = 1e-2,
    device: str | torch.device = "cpu",
    batch: int = 1,
    dynamo: bool = False,
) -> ExportReport:
    """Export model as (left, right) -> disp with fixed iters; check, simplify, lint, verify, write atomically."""
    start = time.perf_counter()
    check_image_size(height, width)
    if iters < 1 or batch < 1:
        raise ConfigError(f"iters={iters}, batch={batch}; both must be >= 1")
    path = Path(path)
    device = torch.device(device)
    model_device = _model_device(model)
    if model_device is not None and model_device.type != device.type:
        raise ConfigError(f"the model is on {model_device} but device='{device}'; pass device='{model_device}' "
                          f"or move the model with model.to('{device}')")
    wrapper = DeployWrapper(model, iters)
    was_training = model.training
    # The wrapper itself must be in eval mode too: the TorchScript exporter restores the *wrapper's*
    # mode after tracing, recursively, which would otherwise switch BatchNorm to batch statistics
    # (and update its running stats) for the parity run.
    wrapper.eval()
    try:
        left, right = random_stereo_pair(batch, height, width, seed=0, device=device)
        with torch.no_grad():
            _check_output(wrapper(left, right), batch, height, width)
        with staging_dir(path) as stage:
            raw = stage / "raw.onnx"
            _torch_export(wrapper, (left, right), raw, opset, dynamic, dynamo)
            try:
                onnx.checker.check_model(str(raw))
            except onnx.checker.ValidationError as err:
                raise ExportError(f"the exported graph fails onnx.checker: {err}") from err
            proto = onnx.load(str(raw))
            if simplify:
                proto = _slim(proto)
            # Scopes follow the TorchScript exporter's naming; DeployWrapper holds the model as .model.
            keep_fp32 = [] if dynamo else fp32_node_patterns(model, prefix="model")
            _set_metadata(proto, {"iters": iters, "height": height, "width": width, "dynamic": dynamic,
                                  "version": ffsc_version(), "keep_fp32_nodes": json.dumps(keep_fp32)})
            staged = save_onnx(proto, stage / path.name)
            try:
                onnx.checker.check_model(str(staged[-1]))
            except onnx.checker.ValidationError as err:
                raise ExportError(f"the simplified graph fails onnx.checker: {err}; retry with "
                                  "simplify=False") from err
            findings = lint_onnx(proto) + _unmatched_patterns(proto, keep_fp32)
            errors = [f for f in findings if f.severity == "error"]
            if errors:
                listing = "\n  ".join(str(f) for f in errors)
                raise ExportError(f"the graph has {len(errors)} TensorRT blockers:\n  {listing}")
            diff = None
            if check_parity:
                shapes = [(batch, height, width)]
                if dynamic:
                    shapes.append((batch + 1, height + 32, width + 32))
                diff = _parity(wrapper, staged[-1], device, shapes, tolerance)
            size = sum(p.stat().st_size for p in staged)
            publish(staged, path)
    finally:
        model.train(was_training)
    return ExportReport(
        path=path, opset=opset, iters=iters, inputs=_tensor_specs(proto.graph.input),
        outputs=_tensor_specs(proto.graph.output), max_abs_diff=diff, onnx_bytes=size,
        node_count=len(proto.graph.node), lint=findings, seconds=time.perf_counter() - start,
        exporter="dynamo" if dynamo else "torchscript", keep_fp32_nodes=keep_fp32,
    )
