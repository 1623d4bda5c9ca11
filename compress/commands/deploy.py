"""Deployment subcommands: ``ffsc export``, ``ffsc bench`` and ``ffsc infer``; the work is in compress.deploy.

``--model`` is resolved by :func:`compress.models.resolve_model`; ``ffsc bench`` and ``ffsc infer`` also take an
``.onnx`` file or a TensorRT engine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.table import Table
from tqdm import tqdm

from compress.atomic import atomic_write_text
from compress.backends import get_backend
from compress.deploy import (
    Frame,
    available_backends,
    bench_model,
    check_memory,
    check_outputs,
    check_outputs_writable,
    check_pair,
    disparity_to_geometry,
    export_model,
    frames_from_dataset,
    frames_from_folders,
    open_predictor,
    output_location,
    plan_outputs,
    read_stereo_pair,
    replace_outputs,
    write_outputs,
)
from compress.deploy.infer import parse_formats
from compress.device import pick_device
from compress.errors import ConfigError, DataError
from compress.export import check_image_size
from compress.geometry import read_intrinsics
from compress.models import ENGINE_SUFFIXES, ResolvedModel, resolve_model
from compress.preflight import check_dataset, check_exported_file, check_model_source, check_writable
from compress.terminal import console


def _iters(args: argparse.Namespace, resolved: ResolvedModel) -> int:
    iters = args.iters if args.iters is not None else resolved.default_iters
    if iters is None and resolved.kind == "onnx":  # its description already says whether ffsc exported it
        raise ConfigError(f"--model {args.model} records no GRU iteration count (it is fixed inside the graph); pass "
                          "--iters with that count, which labels the results")
    if iters is None:
        raise ConfigError(f"{resolved.description} records no iteration count; pass --iters")
    if iters < 1:
        raise ConfigError(f"--iters {iters}: need at least 1 GRU iteration")
    return iters


# ------------------------------------------------------------------------------------------------ export


def _export_device(name: str | None) -> str:
    return name or "cpu"  # export and its parity check run on the CPU unless asked otherwise


def _print_export(report: dict) -> None:
    onnx = report["onnx"]
    table = Table("", "", title=f"ffsc export: {report['model']}", show_header=False)
    table.add_row("output", f"{report['output']} ({report['format']}, {report['precision']})")
    if report["format"] == "engine":
        table.add_row("ONNX source", onnx["path"])
    shapes = ", ".join(f"{s['name']} {list(s['shape'])}" for s in onnx["inputs"])
    table.add_row("inputs", shapes)
    table.add_row("iterations / opset", f"{onnx['iters']} / {onnx['opset']}")
    diff = onnx["max_abs_diff"]
    table.add_row("parity (ONNX Runtime vs PyTorch)", "skipped" if diff is None else f"max abs diff {diff:.3g} px")
    table.add_row("ONNX size / nodes", f"{onnx['onnx_bytes'] / 1e6:.1f} MB / {onnx['node_count']}")
    counts = {s: sum(f["severity"] == s for f in onnx["lint"]) for s in ("error", "warning", "info")}
    table.add_row("TensorRT lint", ", ".join(f"{n} {s}" for s, n in counts.items()))
    table.add_row("float32 islands", ", ".join(onnx["keep_fp32_nodes"]) or "none")
    if "fp16" in report:
        fp16 = report["fp16"]
        table.add_row("fp16 graph", f"{fp16['bytes'] / 1e6:.1f} MB, {fp16['kept_fp32_nodes']} nodes kept fp32, "
                                    f"max abs diff vs fp32 {fp16['max_abs_diff_vs_fp32']:.3g} px")
    if "engine" in report:
        eng = report["engine"]
        state = "reused from cache" if eng["cached"] else f"built in {eng['build_seconds']:.1f} s"
        table.add_row("engine", f"{eng['bytes'] / 1e6:.1f} MB, TensorRT {eng['tensorrt_version']} on "
                                f"{eng['gpu_name']}, {state}")
    table.add_row("export time", f"{onnx['seconds']:.1f} s")
    out = console()
    out.print(table)
    for finding in onnx["lint"]:
        if finding["severity"] != "info":
            where = f" at {finding['node']} ({finding['op_type']})" if finding["node"] else ""
            out.print(f"  [{finding['severity']}] {finding['code']}{where}: {finding['detail']}")


def _write_json(path: str, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def cmd_export(args: argparse.Namespace) -> int:
    """Export a teacher, student or preset to ONNX or a TensorRT engine and print the export report."""
    check_image_size(args.height, args.width)
    pick_device(args.device)  # one line for a device this machine lacks, before a model loads
    check_writable(args.out, key="--out")  # before the export's slow work, not after it
    if args.json:
        check_writable(args.json, key="--json")
    check_model_source(args.model, trust_pickle=args.trust_checkpoint)
    resolved = resolve_model(args.model, args.config, args.trust_checkpoint)
    print(f"--model {args.model}: {resolved.description}")
    report = export_model(
        resolved, Path(args.out), args.format, args.height, args.width, _iters(args, resolved), dynamic=args.dynamic,
        opset=args.opset, precision=args.precision, workspace_gb=args.workspace_gb,
        device=_export_device(args.device), check_parity=not args.no_parity,
    )
    _print_export(report)
    if args.json:
        _write_json(args.json, report)
    return 0


# ------------------------------------------------------------------------------------------------- bench


def _print_bench(report: dict) -> None:
    machine = report["machine"]
    title = (f"ffsc bench: {report['model']} at {report['height']}x{report['width']}, {report['iters']} iterations")
    table = Table("backend", "device", "precision", "median ms", "p10 ms", "p90 ms", "params (M)", "GMACs",
                  title=title)
    for row in report["results"]:
        params = "-" if row["params"] is None else f"{row['params'] / 1e6:.2f}"
        gmacs = "-" if row["gmacs"] is None else f"{row['gmacs']:.1f}"
        table.add_row(get_backend(row["backend"]).describe(), row["device"], row["precision"],
                      f"{row['median_ms']:.2f}", f"{row['p10_ms']:.2f}", f"{row['p90_ms']:.2f}", params, gmacs)
    out = console()
    out.print(table)
    out.print(f"machine: {machine['cpu']} ({machine['cores']} cores), GPU {machine['gpu'] or 'none'}, torch "
              f"{machine['torch']}, onnxruntime {machine['onnxruntime']}")


def cmd_bench(args: argparse.Namespace) -> int:
    """Time a model on one or more backends and print median/p10/p90 latency with params and GMACs."""
    check_image_size(args.height, args.width)
    pick_device(args.device)  # one line for a device this machine lacks, before a model loads
    for key, path in (("--json", args.json), ("--cache", args.cache)):
        if path:
            check_writable(path, key=key)  # before the timing, not after it
    check_exported_file(args.model, key="--model")
    resolved = resolve_model(args.model, args.config, args.trust_checkpoint, allow_files=True)
    print(f"--model {args.model}: {resolved.description}")
    backends = list(dict.fromkeys(b for value in (args.backend or available_backends()) for b in value.split(",")))
    report = bench_model(
        resolved, backends, args.height, args.width, _iters(args, resolved), warmup=args.warmup,
        repeats=args.repeats, precision=args.precision, compile=args.compile, cuda_graph=args.cuda_graph,
        threads=args.threads, device=args.device, cache=args.cache, clock=args.clock,
    )
    _print_bench(report)
    if args.json:
        _write_json(args.json, report)
    return 0


# ------------------------------------------------------------------------------------------------- infer


_LEGACY_SOURCES = (("checkpoint", "a FoundationStereo checkpoint"), ("onnx", "an .onnx file"),
                   ("engine", "a TensorRT engine"))


def _model_spec(args: argparse.Namespace) -> str:
    """--model, or the older --checkpoint / --onnx / --engine (each checked against the file it names)."""
    given = [(name, getattr(args, name)) for name, _ in _LEGACY_SOURCES if getattr(args, name)]
    if args.model and given:
        raise ConfigError(f"pass the model once: --model or --{given[0][0]}, not both")
    if args.model:
        return args.model
    if not given:
        raise ConfigError("no model: pass --model (a checkpoint, student directory, .onnx file or TensorRT engine)")
    name, value = given[0]
    suffix = Path(value).suffix
    if name == "onnx" and suffix != ".onnx":
        raise ConfigError(f"--onnx {value} does not end in .onnx; pass TensorRT engines with --engine")
    if name == "engine" and suffix == ".onnx":
        raise ConfigError(f"--engine {value} is an ONNX file; pass it with --onnx")
    if name == "engine" and suffix not in ENGINE_SUFFIXES:
        raise ConfigError(f"--engine {value}: expected a TensorRT engine ({', '.join(ENGINE_SUFFIXES)})")
    return value


def _model_key(args: argparse.Namespace) -> str:
    """The option the model was given with, for messages about its file."""
    return next((f"--{name}" for name, _ in _LEGACY_SOURCES if getattr(args, name)), "--model")


def _source(args: argparse.Namespace) -> dict[str, str]:
    """The input of this run, as absolute paths: what an output folder's record is compared with."""
    names = ("pairs",) if args.pairs else ("left", "right")
    return {name: str(Path(getattr(args, name)).absolute()) for name in names}


def _frames(args: argparse.Namespace):
    """(frames, folder mode?) from --left/--right (files or folders) or --pairs."""
    if args.pairs:
        if args.left or args.right:
            raise ConfigError("pass either --pairs DIR or --left and --right, not both")
        check_dataset(args.pairs, key="--pairs")  # one line; the reader's own error lists every layout it tried
        return frames_from_dataset(args.pairs), True
    if not (args.left and args.right):
        raise ConfigError("no input: pass --left and --right (two images or two folders), or --pairs DIR")
    left, right = Path(args.left), Path(args.right)
    if left.is_dir():
        return frames_from_folders(left, right), True
    if right.is_dir():
        raise DataError(f"--right {right} is a folder but --left {left} is not; pass two images or two folders")
    return [Frame(left.stem, left, right)], False


def _calibration(args: argparse.Namespace):
    """(StereoCalibration or None, (fx, baseline) or None), scaled with the images."""
    if args.intrinsics and (args.fx is not None or args.baseline is not None):
        raise ConfigError("--intrinsics already holds fx and the baseline; drop --fx/--baseline")
    if args.intrinsics:
        return read_intrinsics(args.intrinsics).scaled(args.scale), None
    if args.fx is not None or args.baseline is not None:
        if args.fx is None or args.baseline is None:
            raise DataError("depth needs both --fx (focal length, pixels) and --baseline (metres), or --intrinsics")
        return None, (args.fx * args.scale, args.baseline)
    if args.remove_invisible:
        raise ConfigError("--remove-invisible drops points of the depth map and cloud; it needs --intrinsics")
    return None, None


def cmd_infer(args: argparse.Namespace) -> int:
    """Disparity (and with a calibration depth and a coloured point cloud) for a pair or a folder of pairs."""
    if not 0 < args.scale <= 1:
        raise ConfigError(f"--scale {args.scale}: expected 0 < scale <= 1 (the images are shrunk by it)")
    spec = _model_spec(args)
    pick_device(args.device)  # one line for a device this machine lacks, before a model loads
    check_exported_file(spec, key=_model_key(args))
    frames, folder_mode = _frames(args)
    calib, fx_baseline = _calibration(args)
    formats = parse_formats(args.formats)
    out = Path(args.out)
    with_depth = calib is not None or fx_baseline is not None
    plans = [plan_outputs(out, f.name if folder_mode else None, formats, with_depth, calib is not None)
             for f in frames]
    check_outputs_writable([p for plan in plans for p in plan.all()])
    size = None if folder_mode else check_pair(frames[0], args.scale)  # a folder's frames are checked one by one
    location, source = output_location(out, folder_mode), _source(args)
    previous = check_outputs(location, source, args.overwrite)

    predictor = open_predictor(spec, args.config, args.device, args.iters, args.hierarchical, args.mixed_precision,
                               args.trust_checkpoint)
    if size is not None:
        check_memory(predictor, *size, scale=args.scale)
    print(f"--model {spec}: {predictor.description}, {predictor.where}")
    done, skipped, seconds, all_written = 0, [], 0.0, []
    for frame, plan in tqdm(list(zip(frames, plans, strict=True)), desc="infer", unit="pair",
                            disable=not folder_mode, file=sys.stderr):
        try:
            if folder_mode:
                check_memory(predictor, *check_pair(frame, args.scale), scale=args.scale)
            left, right = read_stereo_pair(frame.left, frame.right, args.scale)
            start = time.perf_counter()
            disp = predictor(left, right)
            seconds += time.perf_counter() - start
            result = disparity_to_geometry(disp, left, calib, fx_baseline, args.zfar, args.remove_invisible)
            written = write_outputs(result, plan)
            all_written += written
        except DataError as exc:
            if not folder_mode:
                raise
            skipped.append(frame.name)
            tqdm.write(f"skipped {frame.name}: {exc}", file=sys.stderr)
            continue
        done += 1
        if not folder_mode:
            h, w = disp.shape
            print(f"disparity {h}x{w} (height x width) in {seconds:.2f} s")
            for path in written:
                print(f"  -> {path}")
            if result.points is not None:
                print(f"  point cloud: {len(result.points)} points (zfar {args.zfar:g} m)")
    if done:  # a run that wrote nothing leaves the earlier outputs and their record as they were
        removed = replace_outputs(location, previous, all_written, source)
        if removed:
            print(f"removed {len(removed)} earlier output file(s) this run did not rewrite")
    if folder_mode:
        print(f"{done} of {len(frames)} pairs -> {out} ({seconds:.1f} s of inference)"
              + (f"; skipped {len(skipped)}: {', '.join(skipped)}" if skipped else ""))
        if done == 0:
            raise DataError(f"every pair failed ({len(frames)}); see the messages above")
        return 1 if skipped else 0
    return 0

# ---------------------------------------------------------------------------------------------- register


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="saved student directory, teacher checkpoint (.pth/.safetensors), preset name or "
                        "teacher:<vits|vitb|vitl> (random weights)")
    p.add_argument("--config", default=None, help="teacher cfg.yaml (default: the one beside the checkpoint)")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow pickled objects in the checkpoint")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--iters", type=int, default=None,
                   help="GRU iterations, fixed at export (default: the model's own count)")
    p.add_argument("--device", default=None)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the deployment subcommands."""
    p = sub.add_parser("export", help="export a model to ONNX or a TensorRT engine, with parity and lint")
    _model_args(p)
    p.add_argument("--format", choices=["onnx", "engine"], default="onnx")
    p.add_argument("--out", required=True, help="output .onnx or engine file")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch/height/width (students only)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--workspace-gb", dest="workspace_gb", type=float, default=4.0, help="TensorRT builder workspace")
    p.add_argument("--no-parity", dest="no_parity", action="store_true", help="skip the ONNX Runtime parity check")
    p.add_argument("--json", default=None, help="also write the export report to this JSON file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="latency on torch / onnxruntime / tensorrt, with params and GMACs")
    _model_args(p)
    p.add_argument("--backend", action="append", default=None,
                   help="torch, onnxruntime or tensorrt; repeat or comma-separate for several (default: all here)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (torch backend)")
    p.add_argument("--cuda-graph", dest="cuda_graph", action="store_true", help="replay a CUDA graph (GPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch and onnxruntime)")
    p.add_argument("--clock", choices=["wall", "thread"], default="wall",
                   help="thread: CPU time of a single-threaded CPU run (needs --threads 1; steady on busy cores)")
    p.add_argument("--cache", default=None, help="SQLite latency cache file")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("infer", help="disparity, depth and point clouds with any model kind, for a pair or folders")
    p.add_argument("--model", default=None,
                   help="FoundationStereo checkpoint (.pth/.safetensors, cfg.yaml beside it), student directory, "
                        ".onnx file or TensorRT engine")
    for name, what in _LEGACY_SOURCES:
        p.add_argument(f"--{name}", default=None, help=f"{what} (same as --model)")
    p.add_argument("--config", default=None, help="teacher cfg.yaml (default: the one beside the checkpoint)")
    p.add_argument("--left", help="left image, or a folder of left images")
    p.add_argument("--right", help="right image, or a folder of right images with the same names")
    p.add_argument("--pairs", help="a folder of pairs in any layout the dataset readers know")
    p.add_argument("--out", required=True,
                   help="output folder; or, for one pair, a .npy/.pfm/.png disparity file (depth and cloud beside)")
    p.add_argument("--formats", default="npy,png",
                   help="map formats in an output folder: npy, pfm, png (disparity colour map, 16-bit mm depth)")
    p.add_argument("--intrinsics", help="K.txt: the 3x3 camera matrix row by row on line 1, baseline (m) on line 2")
    p.add_argument("--scale", type=float, default=1.0, help="shrink the images by this factor (K scaled with them)")
    p.add_argument("--zfar", type=float, default=10.0, help="drop cloud points farther than this (metres)")
    p.add_argument("--remove-invisible", dest="remove_invisible", action="store_true",
                   help="no depth where the match falls outside the right image")
    p.add_argument("--fx", type=float, default=None, help="focal length in pixels, for depth without --intrinsics")
    p.add_argument("--baseline", type=float, default=None, help="baseline in metres, with --fx")
    p.add_argument("--iters", type=int, default=None, help="GRU iterations (default: the model's own)")
    p.add_argument("--hierarchical", action="store_true", help="two-pass mode for large images (PyTorch models)")
    p.add_argument("--mixed-precision", dest="mixed_precision", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--trust-checkpoint", action="store_true", help="allow pickled objects in the checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of a different input already in --out (a rerun on the same input "
                        "always replaces its own)")
    p.set_defaults(func=cmd_infer)
