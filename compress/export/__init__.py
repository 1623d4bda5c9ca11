"""Deployment export: ONNX (+ parity, TensorRT lint), fp16 graph casting, TensorRT engines and runners.

Modules, one job each: onnx_export (to_onnx), runtime (ONNX Runtime sessions, run_onnx, random
inputs), trt_lint (lint_onnx), fp16 (cast_onnx_fp16), engine (build_engine, sidecar, cache key,
shape profiles), trt_runner (TensorRTRunner), exported (ExportedStereo: an ONNX file or engine run on
images of any size). TensorRT is imported lazily, only by engine, trt_runner and exported.
"""

from compress.export.engine import (
    PRECISIONS,
    EngineInfo,
    build_engine,
    engine_cache_key,
    find_cached_engine,
    make_shape_profiles,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)
from compress.export.exported import ExportedStereo
from compress.export.fp16 import DEFAULT_KEEP_FP32_OPS, Fp16CastReport, cast_onnx_fp16, fp32_island_names
from compress.export.onnx_export import (
    DeployWrapper,
    ExportReport,
    TensorSpec,
    check_image_size,
    fp32_node_patterns,
    read_metadata,
    recorded_fp32_nodes,
    to_onnx,
)
from compress.export.runtime import INPUT_NAMES, OUTPUT_NAME, make_session, random_stereo_pair, run_onnx
from compress.export.trt_lint import TRT10_SUPPORTED_OPS, LintFinding, lint_onnx
from compress.export.trt_runner import TensorRTRunner

__all__ = [
    "DEFAULT_KEEP_FP32_OPS",
    "INPUT_NAMES",
    "OUTPUT_NAME",
    "PRECISIONS",
    "TRT10_SUPPORTED_OPS",
    "DeployWrapper",
    "EngineInfo",
    "ExportReport",
    "ExportedStereo",
    "Fp16CastReport",
    "LintFinding",
    "TensorRTRunner",
    "TensorSpec",
    "build_engine",
    "cast_onnx_fp16",
    "check_image_size",
    "engine_cache_key",
    "find_cached_engine",
    "fp32_island_names",
    "fp32_node_patterns",
    "lint_onnx",
    "make_session",
    "make_shape_profiles",
    "random_stereo_pair",
    "read_metadata",
    "read_sidecar",
    "recorded_fp32_nodes",
    "run_onnx",
    "sidecar_path",
    "to_onnx",
    "write_sidecar",
]
