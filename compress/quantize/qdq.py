"""The Q/DQ graph: node groups of the sensitivity pass, ONNX Runtime's static quantizer and running a graph on
frames."""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import Iterator, Sequence
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
import onnx

from compress.errors import ExportError, MissingDependencyError
from compress.export.runtime import OUTPUT_NAME, make_session
from compress.metrics import epe
from compress.quantize.config import QuantizeConfig
from compress.quantize.frames import CalibrationFrame
from compress.terminal import progress_bar


def node_group(name: str, op_type: str, depth: int = 2) -> str:
    """Sensitivity group of a node: its module scope below the model (depth levels), or its op type at top level.

    Repeated calls of one module (the unrolled GRU iterations, '_1', '_2' suffixes) fall into one group.
    """
    parts = [p for p in name.split("/")[:-1] if p]
    if parts and parts[0] == "model":
        parts = parts[1:]
    parts = [re.sub(r"_\d+$", "", p) for p in parts]
    if not parts:
        return f"{op_type} (top level)"
    return "/".join(parts[:depth])


def conv3d_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the 3-D (rank-5 weight) Conv/ConvTranspose nodes: the cost-volume filtering."""
    ranks = {i.name: len(i.dims) for i in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type in ("Conv", "ConvTranspose") and len(n.input) > 1 and ranks.get(n.input[1]) == 5]


def quantizable_groups(model: onnx.ModelProto, op_types: Sequence[str], depth: int,
                       keep_float: Sequence[str] = ()) -> dict[str, list[onnx.NodeProto]]:
    """Candidate nodes (op type listed, name not matching a keep_float pattern) grouped by :func:`node_group`."""
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.op_type not in op_types or not node.name:
            continue
        if any(fnmatchcase(node.name, p) for p in keep_float):
            continue
        groups.setdefault(node_group(node.name, node.op_type, depth), []).append(node)
    return groups


# ------------------------------------------------------------------------------------------ quantizer


class _Reader:
    """ONNX Runtime CalibrationDataReader over frames, with a progress bar (a line every 30 s in a log): the
    calibration runs the graph on every frame and can take minutes."""

    def __init__(self, frames: list[CalibrationFrame], progress: bool = False) -> None:
        self._it = iter(frames)
        self._handed = False
        self._bar = progress_bar(total=len(frames), desc="calibrating", unit="frame", disable=not progress)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._handed:  # ONNX Runtime asks for the next frame once it has run the last one
            self._bar.update(1)
        frame = next(self._it, None)
        self._handed = frame is not None
        if frame is None:
            self.close()
            return None
        return frame.feeds()

    def close(self) -> None:
        """End the progress bar (idempotent)."""
        self._bar.close()

    def rewind(self) -> None:  # part of the reader protocol; calibration reads once
        pass


def _method(name: str):
    # onnxruntime is an optional extra (cpu or gpu build): imported only when quantizing
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


PREPROCESS_ADVICE = "pre-processing before quantization"
"""Part of ONNX Runtime's advice to run ``quant_pre_process`` first, logged twice per ``quantize_static`` call."""


class _DropPreprocessAdvice(logging.Filter):
    """Drops ONNX Runtime's 'consider pre-processing' advice; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return PREPROCESS_ADVICE not in record.getMessage()


@contextlib.contextmanager
def quiet_preprocess_advice() -> Iterator[None]:
    """Within: ONNX Runtime's 'consider pre-processing' advice is not printed; its real warnings and errors are."""
    # The advice is no finding: its shape-inference pre-pass does not change our graphs' Q/DQ placement, and the
    # sensitivity pass quantizes many times, so it printed ~30 identical lines. It goes to the root logger.
    root = logging.getLogger()
    advice = _DropPreprocessAdvice()
    root.addFilter(advice)
    handler = None
    if not root.handlers:  # else logging.warning() would basicConfig() a root handler that outlives the call
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
        root.addHandler(handler)
    try:
        yield
    finally:
        root.removeFilter(advice)
        if handler is not None:
            root.removeHandler(handler)


def quantize_graph(src: Path, dst: Path, cfg: QuantizeConfig, cache: Path, frames: list[CalibrationFrame] | None,
                   nodes_to_quantize: list[str] | None, nodes_to_exclude: list[str], progress: bool = False) -> None:
    """Quantize src to dst with ONNX Runtime (calibrating on frames, with a progress bar when ``progress``, or
    reusing the ranges cached in cache)."""
    # onnxruntime is an optional extra (cpu or gpu build): imported only when quantizing
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        import onnxruntime

        raise MissingDependencyError(
            f"onnxruntime {onnxruntime.__version__} cannot reuse calibration ranges (quantize_static has no "
            "calibration_cache_path); the sensitivity pass needs a newer one: pip install -U onnxruntime (1.32 works)")
    reader = _Reader(frames, progress) if frames is not None else None
    # TensorRT takes symmetric signed INT8 only (zero point 0); ONNX Runtime's x86 kernels are fastest with
    # unsigned asymmetric activations (U8S8). Weights are symmetric signed INT8 for both.
    trt = cfg.target == "tensorrt"
    extra = {"ActivationSymmetric": trt, "WeightSymmetric": True}
    if cfg.method == "percentile":
        extra["CalibPercentile"] = 99.999
    try:
        with quiet_preprocess_advice():
            quantize_static(
                str(src), str(dst), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(cfg.op_types),
                per_channel=cfg.per_channel, activation_type=QuantType.QInt8 if trt else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=nodes_to_quantize, nodes_to_exclude=nodes_to_exclude,
                calibrate_method=_method(cfg.method), calibration_cache_path=str(cache), extra_options=extra,
            )
    except Exception as err:
        raise ExportError(f"ONNX Runtime quantize_static failed on {src}: {type(err).__name__}: {err}") from err
    finally:
        if reader is not None:
            reader.close()


def run_frames(path: Path, frames: list[CalibrationFrame], threads: int | None) -> list[np.ndarray]:
    """The disparity of the graph at path for each frame (ONNX Runtime on the CPU)."""
    session = make_session(path, "cpu", intra_op_threads=threads)
    try:
        return [session.run([OUTPUT_NAME], f.feeds())[0] for f in frames]
    except Exception as err:
        raise ExportError(f"ONNX Runtime failed to run {path}: {err}") from err


def epe_between(pred: list[np.ndarray], ref: list[np.ndarray]) -> float:
    """Mean absolute disparity difference of two runs, frame by frame (px)."""
    return float(np.mean([np.mean(np.abs(p - r)) for p, r in zip(pred, ref, strict=True)]))


def gt_epe(disps: list[np.ndarray], frames: list[CalibrationFrame]) -> float | None:
    """Mean EPE of disparities against the frames' ground truth (None when no frame has any)."""
    scores = [epe(d[0, 0], f.disp, f.valid) for d, f in zip(disps, frames, strict=True)
              if f.disp is not None and f.valid is not None and f.valid.any()]
    return float(np.mean(scores)) if scores else None

