"""One block timed alone on a latency backend, with the registry's step and the project's ONNX exporter, timed as
compress.latency.measure times whole models."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.backends import get_backend
from compress.export.onnx_export import export_module, fp32_node_patterns
from compress.latency import check_clock, time_calls
from teacher.stages import use_precision


@dataclass
class BlockTiming:
    """Latency of one block variant (one call) in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int


def _summary(times: list[float]) -> BlockTiming:
    arr = np.asarray(times, dtype=np.float64)
    return BlockTiming(float(np.median(arr)), float(np.percentile(arr, 10)), float(np.percentile(arr, 90)),
                       len(times))


def time_module(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    backend: str,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = None,
    clock: str = "wall",
) -> BlockTiming:
    """Latency of ``module(*inputs)`` on a backend, timed as compress.latency.measure times whole models."""
    runner = get_backend(backend)
    device = torch.device(device)
    check_clock(clock, device, runner.threads(threads))
    inputs = tuple(t.to(device) for t in inputs)
    module = module.to(device).eval()
    with tempfile.TemporaryDirectory(prefix="ffsc-block-") as tmp:
        workdir, target, keep = Path(tmp), module, None
        named = {f"x{i}": t for i, t in enumerate(inputs)}
        if runner.exports_onnx:
            target = workdir / "block.onnx"
            export_module(module, inputs, target)
            keep = tuple(fp32_node_patterns(module))
        # The block's stages run at the precision timed, as in measure().
        with use_precision(module, precision):
            step = runner.prepare(target, named, workdir, device, precision, threads=threads, keep_fp32_nodes=keep)
            return _summary(time_calls(step, device, warmup, repeats, events=runner.gpu_events, stream=step.stream,
                                       clock=clock))
