"""Deployment subcommands: ``ffsc export`` and ``ffsc bench``, and the ONNX/TensorRT runner of ``ffsc infer``.

``--model`` is resolved by :func:`compress.models.resolve_model`; ``ffsc bench`` also takes an ``.onnx``
file or a TensorRT engine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from compress.device import pick_device
from compress.errors import ConfigError, DataError, ExportError
from compress.models import ResolvedModel, resolve_model

from .common import console


def _iters(args: argparse.Namespace, resolved: ResolvedModel) -> int:
    iters = args.iters if args.iters is not None else resolved.default_iters
    if iters is None:
        raise ConfigError(f"{resolved.description} records no iteration count; pass --iters")
    if iters < 1:
        raise ConfigError(f"--iters {iters}: need at least 1 GRU iteration")
    return iters


# ------------------------------------------------------------------------------------------------ export


def _export_device(name: str | None) -> str:
    return name or "cpu"  # export and its parity check run on the CPU unless asked otherwise


def _fp16_drift(fp32_path: Path, fp16_path: Path, height: int, width: int) -> float:
    """Largest |fp16 graph - fp32 graph| disparity on one random pair (ONNX Runtime, CPU)."""
    import numpy as np

    from compress.export import random_stereo_pair, run_onnx

    left, right = random_stereo_pair(1, height, width, seed=1)
    return float(np.max(np.abs(run_onnx(fp16_path, left, right) - run_onnx(fp32_path, left, right))))


def export_model(
    resolved: ResolvedModel,
    out: Path,
    fmt: str,
    height: int,
    width: int,
    iters: int,
    dynamic: bool = False,
    opset: int = 17,
    precision: str = "fp32",
    workspace_gb: float = 4.0,
    device: str = "cpu",
    check_parity: bool = True,
) -> dict:
    """Export a resolved module to ONNX (fp32/fp16) or a TensorRT engine; returns the report as plain data."""
    from compress.export import build_engine, cast_onnx_fp16, make_shape_profiles, to_onnx

    if resolved.module is None:
        raise ConfigError(f"{resolved.description} is already exported; `ffsc export` takes a PyTorch model")
    if resolved.is_teacher and dynamic:
        raise ConfigError("the teacher exports with a static image size only: its ViT input size and positional "
                          "table are fixed per size at export; export one model per size (drop --dynamic)")
    if (fmt == "onnx") != (out.suffix == ".onnx"):
        wanted = "end in .onnx" if fmt == "onnx" else "not end in .onnx (the ONNX source is written beside it)"
        raise ConfigError(f"--out {out}: with --format {fmt} the output must {wanted}")
    if fmt == "onnx" and precision == "bf16":
        raise ConfigError("--format onnx supports --precision fp32 or fp16 (an fp16 graph); bf16 is for engines")
    if fmt == "engine":  # fail before the (slow) ONNX export when no engine can be built here
        from compress.export._trt import import_tensorrt, require_cuda

        import_tensorrt()
        require_cuda("building a TensorRT engine")
    model = resolved.module.to(device)
    report: dict = {"model": resolved.description, "kind": resolved.kind, "format": fmt, "precision": precision,
                    "output": str(out)}
    with tempfile.TemporaryDirectory(prefix="ffsc-export-") as tmp:
        if fmt == "onnx":
            onnx_path = out if precision == "fp32" else Path(tmp) / "model_fp32.onnx"
        else:
            onnx_path = out.with_suffix(".onnx")  # kept beside the engine: its source, and ORT-runnable
        exported = to_onnx(model, onnx_path, height, width, iters, opset=opset, dynamic=dynamic,
                           check_parity=check_parity, device=device)
        report["onnx"] = {**asdict(exported), "path": str(onnx_path if fmt == "engine" else out),
                          "lint": [asdict(f) for f in exported.lint]}
        if fmt == "onnx" and precision == "fp16":
            cast = cast_onnx_fp16(onnx_path, out)
            report["fp16"] = {"kept_fp32_nodes": len(cast.kept_fp32_nodes), "casts_inserted": cast.casts_inserted,
                              "max_abs_diff_vs_fp32": _fp16_drift(onnx_path, out, height, width),
                              "bytes": out.stat().st_size}
        if fmt == "engine":
            shapes = make_shape_profiles(height, width, dynamic=dynamic)
            info = build_engine(onnx_path, out, precision=precision, workspace_gb=workspace_gb, shapes=shapes,
                                iters=iters)
            report["engine"] = {**info.to_dict(), "path": str(out), "bytes": out.stat().st_size,
                                "cached": info.cached}
    return report


def _print_export(report: dict) -> None:
    from rich.table import Table

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
    from compress.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def cmd_export(args: argparse.Namespace) -> int:
    """Export a teacher, student or preset to ONNX or a TensorRT engine and print the export report."""
    from compress.export import check_image_size

    check_image_size(args.height, args.width)
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


def available_backends() -> list[str]:
    """Latency backends usable here: torch and onnxruntime always, tensorrt with TensorRT and a CUDA GPU."""
    import importlib.util

    import torch

    found = ["torch", "onnxruntime"]
    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        found.append("tensorrt")
    return found


def backend_device(backend: str, requested: str | None) -> str:
    """Device a backend runs on: the requested one, else CUDA where that backend can use it, else the CPU."""
    import torch

    if requested:
        return requested
    if backend == "tensorrt":
        return "cuda"
    if not torch.cuda.is_available():
        return "cpu"
    if backend == "onnxruntime":
        import onnxruntime as ort

        return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    return "cuda"


def bench_model(
    resolved: ResolvedModel,
    backends: list[str],
    height: int,
    width: int,
    iters: int,
    warmup: int = 5,
    repeats: int = 20,
    precision: str = "fp32",
    compile: bool = False,
    cuda_graph: bool = False,
    threads: int | None = None,
    device: str | None = None,
    cache: str | None = None,
    clock: str = "wall",
) -> dict:
    """Time a resolved model on each backend; returns machine, model cost and one row per backend."""
    import torch

    from compress.latency import machine_info, measure
    from search_spaces import count_macs, count_params

    unknown = sorted(set(backends) - {"torch", "onnxruntime", "tensorrt"})
    if unknown:
        raise ConfigError(f"unknown --backend {', '.join(unknown)}; valid: torch, onnxruntime, tensorrt")
    cost = {"params": None, "gmacs": None}
    if resolved.module is not None:
        macs = count_macs(resolved.module, height, width, iters=iters)
        cost = {"params": count_params(resolved.module), "gmacs": macs.gmacs}
    rows = []
    for backend in backends:
        dev = backend_device(backend, device)
        target = resolved.module.to(dev) if resolved.module is not None else resolved.path
        if backend == "torch" and threads is not None:
            torch.set_num_threads(threads)  # the user asked for this thread count for this run
        stats = measure(target, backend, height, width, iters=iters, warmup=warmup, repeats=repeats, device=dev,
                        precision=precision, compile=compile, cuda_graph=cuda_graph, cache=cache,
                        intra_op_threads=threads, clock=clock)
        rows.append({**stats.to_dict(), **cost})
    return {"machine": machine_info(), "model": resolved.description, "kind": resolved.kind, "height": height,
            "width": width, "iters": iters, "results": rows}


def _print_bench(report: dict) -> None:
    from rich.table import Table

    machine = report["machine"]
    title = (f"ffsc bench: {report['model']} at {report['height']}x{report['width']}, {report['iters']} iterations")
    table = Table("backend", "device", "precision", "median ms", "p10 ms", "p90 ms", "params (M)", "GMACs",
                  title=title)
    for row in report["results"]:
        params = "-" if row["params"] is None else f"{row['params'] / 1e6:.2f}"
        gmacs = "-" if row["gmacs"] is None else f"{row['gmacs']:.1f}"
        table.add_row(row["backend"], row["device"], row["precision"], f"{row['median_ms']:.2f}",
                      f"{row['p10_ms']:.2f}", f"{row['p90_ms']:.2f}", params, gmacs)
    out = console()
    out.print(table)
    out.print(f"machine: {machine['cpu']} ({machine['cores']} cores), GPU {machine['gpu'] or 'none'}, torch "
              f"{machine['torch']}, onnxruntime {machine['onnxruntime']}")


def cmd_bench(args: argparse.Namespace) -> int:
    """Time a model on one or more backends and print median/p10/p90 latency with params and GMACs."""
    from compress.export import check_image_size

    check_image_size(args.height, args.width)
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


# ----------------------------------------------------------------------------------- exported-model runner


def _pad_amounts(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) replicate padding from size to target, split as InputPadder splits it."""
    pad_h, pad_w = target[0] - size[0], target[1] - size[1]
    return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2


class ExportedStereo:
    """An exported stereo model (ONNX or TensorRT engine) run on images of any size.

    Images are padded as PyTorch inference pads them (replicate, to a multiple of 32); a model exported
    with a static shape gets exactly that shape (smaller images are padded up to it, larger ones refused).
    """

    def __init__(self, path: str | Path, device: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path} does not exist; export a model with `ffsc export`")
        self.is_engine = self.path.suffix != ".onnx"
        self.device = device or ("cuda" if self.is_engine else "cpu")
        self.min_size: tuple[int, int] | None = None
        self.max_size: tuple[int, int] | None = None
        if self.is_engine:
            from compress.export import TensorRTRunner

            self.runner = TensorRTRunner(self.path, device=self.device)
            self.iters = self.runner.info.iters if self.runner.info is not None else None
            if self.runner.info is not None:
                low, _, high = next(iter(self.runner.info.shapes.values()))
                self.min_size, self.max_size = (low[2], low[3]), (high[2], high[3])
        else:
            import onnx

            from compress.export import read_metadata

            proto = onnx.load(str(self.path), load_external_data=False)
            shape = proto.graph.input[0].type.tensor_type.shape
            dims = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
            if len(dims) == 4 and dims[2] and dims[3]:
                self.min_size = self.max_size = (dims[2], dims[3])
            stored = read_metadata(proto).get("iters")
            self.iters = int(stored) if stored else None

    @property
    def static_size(self) -> tuple[int, int] | None:
        """(height, width) the model accepts when it has a single input size, else None."""
        return self.min_size if self.min_size is not None and self.min_size == self.max_size else None

    def _target(self, height: int, width: int) -> tuple[int, int]:
        static = self.static_size
        if static is not None:
            if height > static[0] or width > static[1]:
                raise DataError(
                    f"the images are {width}x{height} but {self.path} was exported for exactly {static[1]}x{static[0]} "
                    f"(a static shape); re-export with --height {-(-height // 32) * 32} --width "
                    f"{-(-width // 32) * 32} or with --dynamic")
            return static
        target = (-(-height // 32) * 32, -(-width // 32) * 32)
        low, high = self.min_size, self.max_size
        if low is not None and high is not None and not (
                low[0] <= target[0] <= high[0] and low[1] <= target[1] <= high[1]):
            raise DataError(f"the padded images are {target[1]}x{target[0]}, outside the engine's size range "
                            f"{self.min_size[1]}x{self.min_size[0]}..{self.max_size[1]}x{self.max_size[0]}; rebuild "
                            "it with a profile that covers this size")
        return target

    def __call__(self, left, right):
        """Disparity (H x W float32 numpy) of an RGB pair (H x W x 3 arrays or 3 x H x W tensors, 0..255)."""
        import torch
        import torch.nn.functional as F

        from teacher.inference import to_image_batch

        left_t, right_t = to_image_batch(left, torch.device("cpu")), to_image_batch(right, torch.device("cpu"))
        if left_t.shape != right_t.shape:
            raise DataError(f"left and right images differ in size: {tuple(left_t.shape)} vs {tuple(right_t.shape)}")
        h, w = left_t.shape[-2:]
        pad = _pad_amounts((h, w), self._target(h, w))
        if any(pad):
            left_t, right_t = (F.pad(t, pad, mode="replicate") for t in (left_t, right_t))
        if self.is_engine:
            disp = self.runner.run(left_t, right_t)
        else:
            from compress.export import run_onnx

            disp = run_onnx(self.path, left_t, right_t, device=self.device)
        return disp[0, 0, pad[2]: pad[2] + h, pad[0]: pad[0] + w]


def infer_exported(args: argparse.Namespace, left_img, right_img):
    """``ffsc infer --onnx/--engine``: (H x W disparity, seconds, where it ran) for one image pair."""
    path = args.onnx or args.engine
    if args.hierarchical:
        raise ConfigError("--hierarchical runs two passes of the PyTorch model; use --checkpoint for it")
    if args.mixed_precision is not None:
        raise ConfigError("--mixed-precision does not apply to an exported model: its precision is fixed at export")
    if args.engine and Path(path).suffix == ".onnx":
        raise ConfigError(f"--engine {path} is an ONNX file; pass it with --onnx")
    if args.onnx and Path(path).suffix != ".onnx":
        raise ConfigError(f"--onnx {path} does not end in .onnx; pass TensorRT engines with --engine")
    model = ExportedStereo(path, pick_device(args.device) if args.engine else (args.device or "cpu"))
    if args.iters is not None and model.iters is not None and args.iters != model.iters:
        raise ConfigError(f"{path} was exported with {model.iters} iterations (fixed at export), --iters {args.iters} "
                          "was asked; drop --iters or re-export")
    start = time.perf_counter()
    disp = model(left_img, right_img)
    where = f"{'TensorRT' if model.is_engine else 'ONNX Runtime'} on {model.device}"
    return disp, time.perf_counter() - start, where


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
