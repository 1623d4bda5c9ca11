"""INT8 post-training quantization of an exported stereo model: a Q/DQ ONNX graph with measured fp32 islands.

Quantizer: ONNX Runtime's static quantization (``onnxruntime.quantization.quantize_static``) in QDQ format,
symmetric signed INT8 activations and per-channel symmetric INT8 weights. Why this one:

- it is already an ffsc dependency and runs here on the CPU; NVIDIA ModelOpt's ONNX PTQ
  (``nvidia-modelopt[onnx]``) pulls in CUDA packages (cupy-cuda12x, onnxruntime-gpu) and is aimed at a
  TensorRT/GPU workflow (its INT8 mode casts the rest of the graph to fp16), so it cannot be a CPU default
  (see the README for what was tried);
- QDQ with symmetric INT8 (zero point 0) everywhere is the form TensorRT's explicit quantization wants: a
  strongly typed TensorRT build takes each DequantizeLinear -> op -> QuantizeLinear as the layer's precision,
  and ONNX Runtime's CPU provider fuses the same pattern into integer kernels (QLinearConv, MatMulInteger);
- it calibrates once and accepts an explicit list of nodes to leave in float, which is what the per-node
  sensitivity pass below needs (the calibration ranges are cached and reused for every trial quantization).

Which parts stay in float is measured, not guessed: the quantizable nodes are grouped by the module that
emitted them (``feature/stages.2``, ``cost_agg/conv1``, ``update_block/gru04``, ``upsampler/spx_2_gru``; nodes
directly under the model, such as the softmax over disparities, by op type), each group alone is quantized
and the disparity's EPE against the fp32 graph on the calibration frames recorded. Groups above
``group_threshold_px`` stay float; if the whole graph then still misses ``max_epe_px`` on the calibration
frames, the next most sensitive groups are released to float one at a time until it does. The model's own
float32 islands (the correlation normalisation that ``to_onnx`` records) are never quantized.

One module over the ~500-line guide: calibration data, the sensitivity pass, quantization and the report are
one pipeline over one ONNX graph and its node groups.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compress.errors import ConfigError, DataError, ExportError, MissingDependencyError
from compress.export._files import publish, save_onnx, staging_dir
from compress.export.onnx_export import _set_metadata, read_metadata, recorded_fp32_nodes
from compress.export.runtime import INPUT_NAMES, OUTPUT_NAME, make_session

DEFAULT_OP_TYPES: tuple[str, ...] = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Softmax", "Resize")
"""Op types offered to the quantizer: the compute-heavy ones with integer kernels (Conv, ConvTranspose, MatMul,
Gemm) plus the numerically delicate Softmax and Resize, so that the sensitivity pass measures them too."""

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
TARGETS = ("cpu", "tensorrt")
"""'cpu': ONNX Runtime on x86 CPUs: unsigned INT8 activations (its fastest integer kernels) and 3-D convolutions
kept float (its INT8 3-D convolution has no fast path: measured 112 ms vs 9.8 ms fp32 for the tiny student's
7x7x7 classifier at 64x128). 'tensorrt': signed symmetric INT8 everywhere (zero point 0, what TensorRT's explicit
quantization accepts), 3-D convolutions quantized too; it also runs in ONNX Runtime, more slowly."""


@dataclass
class QuantizeConfig:
    """Settings of :func:`quantize_onnx` (also the ``quantize`` block of a recipe's export stage)."""

    calib_frames: int = 8
    """Frames that calibrate activation ranges; the sensitivity pass scores on the first ``sensitivity_frames``."""
    eval_frames: int = 4
    """Held-out frames (after the calibration frames) for the report's INT8-vs-fp32 EPE."""
    sensitivity_frames: int = 4
    method: str = "minmax"
    target: str = "cpu"
    per_channel: bool = True
    op_types: list[str] = field(default_factory=lambda: list(DEFAULT_OP_TYPES))
    sensitivity: bool = True
    group_depth: int = 2
    """Module-scope levels below the model that make one sensitivity group (1: whole stages)."""
    group_threshold_px: float = 0.02
    """A group whose INT8 version alone moves the disparity by more than this (EPE vs fp32, px) stays float."""
    max_epe_px: float = 0.1
    """Target EPE of the whole INT8 graph vs fp32 on the calibration frames; the accuracy report's pass mark."""
    exclude: list[str] = field(default_factory=list)
    """Extra node-name patterns (fnmatch) to keep in float, e.g. '*/upsampler/*'."""
    latency_rounds: int = 3
    latency_repeats: int = 5
    threads: int = 1

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ConfigError(f"quantize.method: got {self.method!r}, expected one of {CALIBRATION_METHODS}")
        if self.target not in TARGETS:
            raise ConfigError(f"quantize.target: got {self.target!r}, expected one of {TARGETS}")
        if self.calib_frames < 1 or self.sensitivity_frames < 1 or self.eval_frames < 0:
            raise ConfigError(f"quantize: calib_frames ({self.calib_frames}) and sensitivity_frames "
                              f"({self.sensitivity_frames}) must be >= 1, eval_frames ({self.eval_frames}) >= 0")
        if self.group_depth < 1:
            raise ConfigError(f"quantize.group_depth: got {self.group_depth}, expected >= 1")
        if self.group_threshold_px < 0 or self.max_epe_px <= 0:
            raise ConfigError(f"quantize: group_threshold_px ({self.group_threshold_px}) must be >= 0 and "
                              f"max_epe_px ({self.max_epe_px}) > 0")
        if not self.op_types:
            raise ConfigError("quantize.op_types is empty; list the ONNX op types to quantize (e.g. Conv, MatMul)")


@dataclass
class CalibrationFrame:
    """One stereo pair as the exported graph takes it (1 x 3 x H x W float32, 0..255), with its ground truth:
    the unit of calibration, sensitivity and held-out checks."""

    left: np.ndarray
    right: np.ndarray
    disp: np.ndarray | None = None
    valid: np.ndarray | None = None

    def feeds(self) -> dict[str, np.ndarray]:
        """ONNX Runtime input feed."""
        return {INPUT_NAMES[0]: self.left, INPUT_NAMES[1]: self.right}


@dataclass
class GroupSensitivity:
    """One node group's INT8 cost: the EPE vs fp32 when only this group is quantized."""

    group: str
    nodes: int
    op_types: list[str]
    epe_px: float
    kept_float: bool = False
    reason: str = ""


@dataclass
class QuantizeReport:
    """What quantize_onnx did and how the INT8 graph compares with fp32."""

    path: Path
    source: Path
    height: int
    width: int
    iters: int | None
    calibration: dict[str, Any]
    sensitivity: list[GroupSensitivity]
    kept_float_groups: list[str]
    excluded_nodes: int
    quantized_nodes: int
    qdq_nodes: int
    calib_epe_px: float
    heldout: dict[str, Any]
    latency: dict[str, Any]
    passed: bool
    max_epe_px: float
    seconds: float
    lint: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data = asdict(self)
        data["path"], data["source"] = str(self.path), str(self.source)
        return data

    def markdown(self, title: str | None = None) -> str:
        """The report as Markdown: the accuracy verdict, latency side by side and the sensitivity table."""
        h = self.heldout
        act = "symmetric INT8" if self.calibration["target"] == "tensorrt" else "UINT8"
        lines = [f"# {title or f'INT8 quantization of {self.source.name}'}", "",
                 f"`{self.path.name}` (target {self.calibration['target']}): {self.quantized_nodes} nodes "
                 f"quantized (Q/DQ, {act} activations, INT8 "
                 f"{'per-channel' if self.calibration['per_channel'] else 'per-tensor'} weights), "
                 f"{self.excluded_nodes} candidate nodes kept in float; calibrated on "
                 f"{self.calibration['frames']} frames ({self.calibration['method']}) at {self.height}x{self.width}.",
                 ""]
        verdict = "PASS" if self.passed else "FAIL"
        lines += ["| | value |", "|---|---|",
                  f"| EPE INT8 vs fp32, held-out ({h.get('frames', 0)} pairs) | {_fmt(h.get('epe_vs_fp32'))} px "
                  f"(max {_fmt(h.get('max_abs_diff'))} px) |",
                  f"| EPE INT8 vs fp32, calibration frames | {_fmt(self.calib_epe_px)} px |",
                  f"| accuracy check (held-out EPE <= {self.max_epe_px:g} px) | {verdict} |"]
        if h.get("fp32_epe_gt") is not None:
            lines.append(f"| EPE vs ground truth: fp32 / INT8 | {_fmt(h['fp32_epe_gt'])} / "
                         f"{_fmt(h['int8_epe_gt'])} px |")
        lat = self.latency
        if lat:
            lines.append(f"| latency fp32 / INT8 (median ms, {lat['threads']} thread, {lat['clock']} clock, "
                         f"{lat['rounds']} alternating rounds) | {lat['fp32_ms']:.1f} / {lat['int8_ms']:.1f} "
                         f"({lat['speedup']:.2f}x) |")
        lines += ["", "Per-group sensitivity (EPE vs fp32 with only that group quantized, calibration frames):", "",
                  "| group | nodes | ops | EPE (px) | kept float |", "|---|---|---|---|---|"]
        for g in sorted(self.sensitivity, key=lambda s: -s.epe_px):
            lines.append(f"| {g.group} | {g.nodes} | {', '.join(g.op_types)} | {g.epe_px:.4f} | "
                         f"{g.reason if g.kept_float else ''} |")
        return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


# ------------------------------------------------------------------------------------------- frames


def _fit(sample, height: int, width: int):
    """Centre-crop a sample to height x width when it is large enough, else rescale it."""
    from compress.data.augment import crop_sample, scale_sample

    if sample.height >= height and sample.width >= width:
        return crop_sample(sample, (sample.height - height) // 2, (sample.width - width) // 2, height, width)
    return scale_sample(sample, height, width)


def _synthetic(count: int, height: int, width: int, seed: int):
    from compress.data.synthetic import SyntheticConfig, SyntheticStereoDataset

    max_disp = float(max(8, min(64, width // 5)))
    return SyntheticStereoDataset(count, SyntheticConfig(height=height, width=width, max_disp=max_disp, seed=seed))


def open_frames_source(source: Any, count: int, height: int, width: int, seed: int = 0):
    """A dataset of stereo samples from a label cache folder, a data folder, 'synthetic' or a Dataset."""
    from compress.distill.label_cache import MANIFEST

    if not isinstance(source, (str, os.PathLike)):
        return source
    if str(source) == "synthetic":
        return _synthetic(count, height, width, seed)
    root = Path(source)
    if (root / MANIFEST).is_file():
        manifest = json.loads((root / MANIFEST).read_text())
        dataset = manifest.get("dataset", {})
        synth = dataset.get("synthetic")
        if synth is None:
            raise DataError(f"label cache {root} was made from files ({dataset.get('type', '?')}); it keeps labels, "
                            "not images: pass the data folder it was labelled from as --calib")
        from compress.data.synthetic import SyntheticConfig, SyntheticStereoDataset

        synth = {k: tuple(v) if isinstance(v, list) else v for k, v in synth.items()}
        return SyntheticStereoDataset(int(dataset["size"]), SyntheticConfig(**synth))
    if not root.exists():
        raise DataError(f"--calib {source}: no such folder; pass a label cache folder, a stereo data folder or "
                        "'synthetic'")
    from compress.data.readers import open_dataset

    return open_dataset(root)


def load_frames(
    source: Any, count: int, height: int, width: int, seed: int = 0, offset: int = 0
) -> list[CalibrationFrame]:
    """``count`` frames (from index ``offset``) of a frames source, fitted to height x width."""
    from compress.data.readers import StereoDataset

    dataset = open_frames_source(source, offset + count, height, width, seed)
    if len(dataset) < offset + count:
        raise DataError(f"the calibration source has {len(dataset)} pairs; {offset + count} are needed "
                        f"({offset} before these {count}); lower calib_frames/eval_frames or add data")
    frames = []
    for i in range(offset, offset + count):
        sample = dataset.load(i) if isinstance(dataset, StereoDataset) else dataset[i]
        if isinstance(sample, dict):  # a Dataset of tensor dicts (e.g. LabelledDataset)
            left, right = sample["left"].numpy(), sample["right"].numpy()
            if left.shape[-2:] != (height, width):
                raise DataError(f"calibration item {i} is {left.shape[-2]}x{left.shape[-1]} (height x width), "
                                f"the model takes {height}x{width}")
            disp = sample["disp"][0].numpy() if bool(sample.get("has_gt", False)) else None
            valid = sample["valid"][0].numpy() if disp is not None else None
        else:
            sample = _fit(sample, height, width)
            left = np.ascontiguousarray(sample.left.transpose(2, 0, 1), dtype=np.float32)
            right = np.ascontiguousarray(sample.right.transpose(2, 0, 1), dtype=np.float32)
            disp, valid = sample.disp, sample.valid
        frames.append(CalibrationFrame(left[None].astype(np.float32), right[None].astype(np.float32), disp, valid))
    return frames


# ------------------------------------------------------------------------------------------- groups


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
    """ONNX Runtime CalibrationDataReader over frames."""

    def __init__(self, frames: list[CalibrationFrame]) -> None:
        self._it = iter(frames)

    def get_next(self) -> dict[str, np.ndarray] | None:
        frame = next(self._it, None)
        return None if frame is None else frame.feeds()

    def rewind(self) -> None:  # part of the reader protocol; calibration reads once
        pass


def _method(name: str):
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


def _quantize(src: Path, dst: Path, cfg: QuantizeConfig, cache: Path, frames: list[CalibrationFrame] | None,
              nodes_to_quantize: list[str] | None, nodes_to_exclude: list[str]) -> None:
    import inspect

    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        import onnxruntime

        raise MissingDependencyError(
            f"onnxruntime {onnxruntime.__version__} cannot reuse calibration ranges (quantize_static has no "
            "calibration_cache_path); the sensitivity pass needs a newer one: pip install -U onnxruntime (1.32 works)")
    reader = _Reader(frames) if frames is not None else None
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


def _run(path: Path, frames: list[CalibrationFrame], threads: int | None) -> list[np.ndarray]:
    session = make_session(path, "cpu", intra_op_threads=threads)
    try:
        return [session.run([OUTPUT_NAME], f.feeds())[0] for f in frames]
    except Exception as err:
        raise ExportError(f"ONNX Runtime failed to run {path}: {err}") from err


def _epe(pred: list[np.ndarray], ref: list[np.ndarray]) -> float:
    return float(np.mean([np.mean(np.abs(p - r)) for p, r in zip(pred, ref, strict=True)]))


def _static_size(model: onnx.ModelProto) -> tuple[int, int] | None:
    dims = [d.dim_value if d.HasField("dim_value") else None for d in model.graph.input[0].type.tensor_type.shape.dim]
    return (dims[2], dims[3]) if len(dims) == 4 and dims[2] and dims[3] else None


def _gt_epe(disps: list[np.ndarray], frames: list[CalibrationFrame]) -> float | None:
    from compress.metrics import epe

    scores = [epe(d[0, 0], f.disp, f.valid) for d, f in zip(disps, frames, strict=True)
              if f.disp is not None and f.valid is not None and f.valid.any()]
    return float(np.mean(scores)) if scores else None


def quantize_onnx(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    calib: Any,
    cfg: QuantizeConfig | None = None,
    height: int | None = None,
    width: int | None = None,
    measure_latency: bool = True,
    progress: bool = False,
    heldout: Any = None,
) -> QuantizeReport:
    """Write an INT8 Q/DQ copy of the fp32 ONNX model src to dst, with sensitive groups kept float; report it.

    calib: a label cache folder (synthetic labels regenerate their frames), a stereo data folder, 'synthetic'
    or a Dataset. The first cfg.calib_frames pairs calibrate; the report's cfg.eval_frames held-out pairs are
    the next ones, or the first ones of ``heldout`` (same kinds of source) when given. height/width default to
    the model's static input size.
    """
    start = time.perf_counter()
    cfg = cfg or QuantizeConfig()
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ExportError(f"ONNX file {src} does not exist; export the model first (`ffsc export`)")
    if dst.suffix != ".onnx":
        raise ConfigError(f"the INT8 output {dst} must end in .onnx")
    model = onnx.load(str(src))
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        raise ExportError(f"{src} is already quantized (it has QuantizeLinear/DequantizeLinear nodes); pass the "
                          "fp32 export")
    size = _static_size(model)
    if height is None or width is None:
        if size is None:
            raise ConfigError(f"{src} has a dynamic input size; pass height and width for calibration")
        height, width = size
    elif size is not None and size != (height, width):
        raise ConfigError(f"{src} takes {size[0]}x{size[1]} images (height x width), but {height}x{width} was asked")
    meta = read_metadata(model)
    iters = int(meta["iters"]) if meta.get("iters") else None
    islands = list(recorded_fp32_nodes(model)) + list(cfg.exclude)
    if cfg.target == "cpu":
        islands += conv3d_nodes(model)  # exact names: fnmatch treats them as literal patterns

    def say(msg: str) -> None:
        if progress:
            print(f"[ffsc quantize] {msg}", flush=True)

    if heldout is None:
        frames = load_frames(calib, cfg.calib_frames + cfg.eval_frames, height, width)
        calib_frames, held_out = frames[: cfg.calib_frames], frames[cfg.calib_frames:]
    else:
        calib_frames = load_frames(calib, cfg.calib_frames, height, width)
        # A different seed: 'synthetic' as held-out source must not repeat the calibration pairs.
        held_out = load_frames(heldout, cfg.eval_frames, height, width, seed=1) if cfg.eval_frames else []
    sens_frames = calib_frames[: cfg.sensitivity_frames]
    groups = quantizable_groups(model, cfg.op_types, cfg.group_depth, islands)
    if not groups:
        raise ExportError(f"{src} has no nodes of the op types {cfg.op_types} outside the float islands; nothing "
                          "to quantize")
    island_nodes = [n.name for n in model.graph.node
                    if n.op_type in cfg.op_types and n.name and any(fnmatchcase(n.name, p) for p in islands)]
    candidates = [n.name for nodes in groups.values() for n in nodes]
    with tempfile.TemporaryDirectory(prefix="ffsc-quantize-") as tmp:
        work = Path(tmp)
        cache = work / "calibration.json"
        say(f"fp32 reference on {len(sens_frames)} frames")
        ref_sens = _run(src, sens_frames, cfg.threads)
        say(f"calibrating on {len(calib_frames)} frames ({cfg.method})")
        trial = work / "trial.onnx"
        _quantize(src, trial, cfg, cache, calib_frames, candidates, island_nodes)
        whole_epe = _epe(_run(trial, sens_frames, cfg.threads), ref_sens)

        table: list[GroupSensitivity] = []
        if cfg.sensitivity and len(groups) > 1:
            for i, (name, nodes) in enumerate(groups.items(), 1):
                _quantize(src, trial, cfg, cache, None, [n.name for n in nodes], island_nodes)
                score = _epe(_run(trial, sens_frames, cfg.threads), ref_sens)
                table.append(GroupSensitivity(name, len(nodes), sorted({n.op_type for n in nodes}), score))
                say(f"sensitivity {i}/{len(groups)}: {name} ({len(nodes)} nodes) EPE {score:.4f} px")
        for g in table:
            if cfg.sensitivity and g.epe_px > cfg.group_threshold_px:
                g.kept_float, g.reason = True, f"> {cfg.group_threshold_px:g} px alone"

        def build(kept: set[str]) -> float:
            chosen = [n.name for name, nodes in groups.items() if name not in kept for n in nodes]
            excluded = island_nodes + [n.name for name, nodes in groups.items() if name in kept for n in nodes]
            if not chosen:
                raise ExportError("every node group is too sensitive to quantize within "
                                  f"{cfg.max_epe_px:g} px; raise max_epe_px or group_threshold_px")
            _quantize(src, trial, cfg, cache, None, chosen, excluded)
            return _epe(_run(trial, sens_frames, cfg.threads), ref_sens)

        kept = {g.group for g in table if g.kept_float}
        # The sensitivity pass left a single-group trial in trial.onnx: rebuild the chosen graph.
        calib_epe = build(kept) if kept or cfg.sensitivity and len(groups) > 1 else whole_epe
        if cfg.sensitivity:
            # Release the most sensitive remaining groups to float until the whole graph meets the target.
            for g in sorted((g for g in table if not g.kept_float), key=lambda s: -s.epe_px):
                if calib_epe <= cfg.max_epe_px or len(kept) + 1 >= len(groups):
                    break
                kept.add(g.group)
                g.kept_float, g.reason = True, f"released to meet {cfg.max_epe_px:g} px"
                calib_epe = build(kept)
                say(f"kept {g.group} float: whole-graph EPE {calib_epe:.4f} px")

        proto = onnx.load(str(trial))
        _set_metadata(proto, {**meta, "quantization": json.dumps({
            "format": "QDQ", "target": cfg.target,
            "activations": "int8 symmetric" if cfg.target == "tensorrt" else "uint8 asymmetric",
            "weights": "int8 symmetric " + ("per-channel" if cfg.per_channel else "per-tensor"), "method": cfg.method,
            "kept_float_groups": sorted(kept)})})
        from compress.export.trt_lint import lint_onnx

        lint = [asdict(f) for f in lint_onnx(proto) if f.severity != "info"]
        with staging_dir(dst) as stage:
            staged = save_onnx(proto, stage / dst.name)
            publish(staged, dst)

        heldout: dict[str, Any] = {"frames": len(held_out)}
        if held_out:
            ref = _run(src, held_out, cfg.threads)
            got = _run(dst, held_out, cfg.threads)
            heldout.update(epe_vs_fp32=_epe(got, ref),
                           max_abs_diff=float(max(np.max(np.abs(g - r)) for g, r in zip(got, ref, strict=True))),
                           fp32_epe_gt=_gt_epe(ref, held_out), int8_epe_gt=_gt_epe(got, held_out))
        latency = measure_int8_latency(src, dst, height, width, iters, cfg) if measure_latency else {}
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node)
    kept_nodes = sum(len(groups[g]) for g in kept)
    check = heldout.get("epe_vs_fp32", calib_epe)
    return QuantizeReport(
        path=dst, source=src, height=height, width=width, iters=iters,
        calibration={"frames": len(calib_frames), "method": cfg.method, "per_channel": cfg.per_channel,
                     "op_types": list(cfg.op_types), "target": cfg.target, "sensitivity_frames": len(sens_frames),
                     "group_threshold_px": cfg.group_threshold_px, "whole_graph_epe_px": whole_epe},
        sensitivity=table, kept_float_groups=sorted(kept), excluded_nodes=kept_nodes + len(island_nodes),
        quantized_nodes=len(candidates) - kept_nodes, qdq_nodes=qdq,
        calib_epe_px=calib_epe, heldout=heldout, latency=latency, passed=bool(check <= cfg.max_epe_px),
        max_epe_px=cfg.max_epe_px, seconds=time.perf_counter() - start, lint=lint,
    )


def measure_int8_latency(fp32: Path, int8: Path, height: int, width: int, iters: int | None,
                         cfg: QuantizeConfig) -> dict[str, Any]:
    """fp32 and INT8 graphs timed side by side in alternating rounds in ONNX Runtime on the CPU."""
    from compress.latency import measure_together

    clock = "thread" if cfg.threads == 1 else "wall"
    stats = measure_together({"fp32": fp32, "int8": int8}, "onnxruntime", height, width, iters=iters or 1,
                             rounds=cfg.latency_rounds, warmup=1, repeats=cfg.latency_repeats, device="cpu",
                             intra_op_threads=cfg.threads, clock=clock)
    fp, q = stats["fp32"].median_ms, stats["int8"].median_ms
    return {"fp32_ms": fp, "int8_ms": q, "speedup": fp / q, "threads": cfg.threads, "clock": clock,
            "rounds": cfg.latency_rounds, "repeats": cfg.latency_repeats,
            "fp32_round_medians_ms": stats["fp32"].round_medians_ms,
            "int8_round_medians_ms": stats["int8"].round_medians_ms, "device": stats["fp32"].device}


def write_report(report: QuantizeReport, json_path: str | os.PathLike, title: str | None = None) -> tuple[Path, Path]:
    """Write report as JSON and Markdown (same stem) atomically; returns both paths."""
    from compress.atomic import atomic_write_text

    json_path = Path(json_path)
    md_path = json_path.with_suffix(".md")
    atomic_write_text(json_path, json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    atomic_write_text(md_path, report.markdown(title))
    return json_path, md_path


def quantize_beside(onnx_path: str | os.PathLike, calib: Any, cfg: QuantizeConfig | None = None,
                    heldout: Any = None, progress: bool = False) -> QuantizeReport:
    """The pipeline's one call: ``<stem>_int8.onnx`` and ``<stem>_int8_report.{json,md}`` beside an fp32 export."""
    onnx_path = Path(onnx_path)
    out = onnx_path.with_name(f"{onnx_path.stem}_int8.onnx")
    report = quantize_onnx(onnx_path, out, calib, cfg, progress=progress, heldout=heldout)
    write_report(report, out.with_name(f"{onnx_path.stem}_int8_report.json"))
    return report


__all__ = [
    "CALIBRATION_METHODS",
    "TARGETS",
    "DEFAULT_OP_TYPES",
    "CalibrationFrame",
    "GroupSensitivity",
    "QuantizeConfig",
    "QuantizeReport",
    "load_frames",
    "measure_int8_latency",
    "conv3d_nodes",
    "node_group",
    "quantizable_groups",
    "quantize_beside",
    "quantize_onnx",
    "write_report",
]

