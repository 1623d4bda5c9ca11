"""Export a resolved model to ONNX (fp32 or an fp16 graph) or a TensorRT engine, returning a plain-data report."""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from compress.errors import ConfigError
from compress.models import ResolvedModel
from teacher.stages import use_precision


def _fp16_drift(fp32_path: Path, fp16_path: Path, height: int, width: int) -> float:
    """Largest |fp16 graph - fp32 graph| disparity on one random pair (ONNX Runtime, CPU)."""
    # compress.export loads onnx (about 1.5 s): kept out of import compress.deploy and ffsc --help
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
    # compress.export loads onnx (about 1.5 s): kept out of import compress.deploy and ffsc --help
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
        # compress.export and compress.preflight load onnx (about 1.5 s): kept out of ffsc --help
        from compress.export._trt import import_tensorrt, require_cuda
        from compress.preflight import check_tensorrt_precision  # (see above)

        import_tensorrt()
        require_cuda("building a TensorRT engine")
        check_tensorrt_precision(precision, "--precision")
    model = resolved.module.to(device)
    report: dict = {"model": resolved.description, "kind": resolved.kind, "format": fmt, "precision": precision,
                    "output": str(out)}
    with tempfile.TemporaryDirectory(prefix="ffsc-export-") as tmp:
        if fmt == "onnx":
            onnx_path = out if precision == "fp32" else Path(tmp) / "model_fp32.onnx"
        else:
            onnx_path = out.with_suffix(".onnx")  # kept beside the engine: its source, and ORT-runnable
        # The ONNX graph is float32 (fp16 graphs and engines are cast from it), and so is the model its parity
        # check runs: a mixed_precision model would otherwise autocast to fp16 on CUDA.
        with use_precision(model, "fp32"):
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
