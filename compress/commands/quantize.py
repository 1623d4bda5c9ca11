"""``ffsc quantize MODEL --calib DATA``: INT8 post-training quantization with a per-model accuracy report."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from compress.deploy import export_model
from compress.errors import ConfigError
from compress.export import check_image_size
from compress.models import resolve_model
from compress.preflight import check_frames_source, check_onnx_file, check_writable
from compress.quantize import QuantizeConfig, quantize_onnx, write_report

from .common import console


def _report_path(args: argparse.Namespace, out: Path) -> Path:
    """The report JSON: --report, else <out stem>_report.json beside the INT8 model."""
    return Path(args.report) if args.report else out.with_name(f"{out.stem}_report.json")


def _fp32_path(out: Path) -> Path:
    """Where --keep-fp32 keeps the fp32 export: <out stem>_fp32.onnx beside the INT8 model."""
    return out.with_name(f"{out.stem}_fp32.onnx")


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize an fp32 ONNX export (or a model, exported first) to a Q/DQ INT8 ONNX and write its report."""
    if Path(args.model).suffix.lower() == ".onnx":
        check_onnx_file(args.model, key="model")
    check_frames_source(args.calib, key="--calib")
    check_frames_source(args.heldout, key="--heldout")
    out = Path(args.out)
    if out.suffix != ".onnx":
        raise ConfigError(f"--out {out}: the INT8 model must end in .onnx")
    # Every file written at the end, checked now: calibration and the sensitivity pass take minutes.
    check_writable(out, key="--out")
    check_writable(_report_path(args, out), key="--report")
    if args.keep_fp32:
        check_writable(_fp32_path(out), key="--keep-fp32")
    cfg = QuantizeConfig(
        calib_frames=args.calib_frames, eval_frames=args.eval_frames,
        sensitivity_frames=min(args.sensitivity_frames, args.calib_frames), method=args.method, target=args.target,
        per_channel=not args.per_tensor, sensitivity=not args.no_sensitivity, group_depth=args.group_depth,
        group_threshold_px=args.group_threshold, max_epe_px=args.max_epe, exclude=list(args.exclude or []),
        latency_rounds=args.rounds, latency_repeats=args.repeats, threads=args.threads,
    )
    source = Path(args.model)
    with tempfile.TemporaryDirectory(prefix="ffsc-quantize-cli-") as tmp:
        if source.suffix == ".onnx" and source.is_file():
            fp32 = source
            height, width = (args.height, args.width) if args.height and args.width else (None, None)
        else:
            height, width = args.height or 480, args.width or 640
            check_image_size(height, width)
            resolved = resolve_model(args.model, None, False)
            iters = args.iters or resolved.default_iters
            if iters is None:
                raise ConfigError(f"{resolved.description} records no iteration count; pass --iters")
            fp32 = _fp32_path(out) if args.keep_fp32 else Path(tmp) / "model_fp32.onnx"
            print(f"--model {args.model}: {resolved.description}; exporting fp32 ONNX at {height}x{width}")
            export_model(resolved, fp32, "onnx", height, width, iters)
        report = quantize_onnx(fp32, out, args.calib, cfg, height=height, width=width,
                               measure_latency=not args.no_latency, progress=True, heldout=args.heldout)
    json_path = _report_path(args, out)
    _, md_path = write_report(report, json_path, title=f"INT8 quantization of {args.model}")
    console().print(report.markdown(title=f"INT8 quantization of {args.model}"))
    print(f"wrote {out}, {json_path} and {md_path}")
    return 0 if report.passed or not args.strict else 1


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``ffsc quantize``."""
    p = sub.add_parser("quantize", help="INT8 post-training quantization (Q/DQ ONNX) with an accuracy report")
    p.add_argument("model", help="fp32 .onnx export, or a model `ffsc export` takes (saved student directory, "
                                 "checkpoint, preset), exported first at --height x --width")
    p.add_argument("--calib", required=True,
                   help="calibration frames: a label cache folder (runs/<run>/labels/train), a stereo data folder, "
                        "or 'synthetic'")
    p.add_argument("--heldout", default=None,
                   help="held-out pairs for the accuracy report, same kinds as --calib (default: the --calib pairs "
                        "after the calibration frames)")
    p.add_argument("--out", required=True, help="output INT8 .onnx")
    p.add_argument("--report", default=None, help="report JSON (default: <out stem>_report.json; Markdown beside)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the ONNX's static size, or 480)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the ONNX's static size, or 640)")
    p.add_argument("--iters", type=int, default=None, help="GRU iterations when exporting a model")
    p.add_argument("--keep-fp32", action="store_true", help="keep the fp32 export beside --out as <stem>_fp32.onnx")
    p.add_argument("--target", choices=["cpu", "tensorrt"], default="cpu",
                   help="cpu: ONNX Runtime's fastest form (uint8 activations, 3-D convolutions float); tensorrt: "
                        "symmetric int8 everywhere, for a strongly typed TensorRT build")
    p.add_argument("--calib-frames", type=int, default=8)
    p.add_argument("--eval-frames", type=int, default=4, help="held-out frames for the accuracy report")
    p.add_argument("--sensitivity-frames", type=int, default=4)
    p.add_argument("--method", choices=["minmax", "entropy", "percentile"], default="minmax")
    p.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales (default: per channel)")
    p.add_argument("--no-sensitivity", action="store_true", help="skip the per-group sensitivity pass")
    p.add_argument("--group-depth", type=int, default=2,
                   help="module-scope levels per sensitivity group (1: whole stages, fewer trials)")
    p.add_argument("--group-threshold", type=float, default=0.02,
                   help="a group whose INT8 alone moves the disparity by more EPE (px) than this stays float")
    p.add_argument("--max-epe", type=float, default=0.1, help="accuracy target: EPE of INT8 vs fp32 (px)")
    p.add_argument("--exclude", action="append", default=None, help="node-name pattern to keep float (repeatable)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads for evaluation and timing")
    p.add_argument("--rounds", type=int, default=3, help="alternating latency rounds")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per round")
    p.add_argument("--no-latency", action="store_true", help="skip the side-by-side latency measurement")
    p.add_argument("--strict", action="store_true", help="exit 1 when the held-out EPE misses --max-epe")
    p.set_defaults(func=cmd_quantize)
