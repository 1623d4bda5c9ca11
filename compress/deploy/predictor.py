"""One stereo predictor for every model kind: a FoundationStereo checkpoint, a saved student (or pruned teacher)
directory, an ONNX file or a TensorRT engine, all called as ``predictor(left_rgb, right_rgb) -> H x W disparity``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compress.errors import ConfigError
from compress.models import CHECKPOINT_SUFFIXES, ENGINE_SUFFIXES, ResolvedModel, resolve_model
from teacher import infer

# What --model may name for inference; presets and random teachers have no trained weights to infer with.
INFER_KINDS = ("teacher", "student", "onnx", "engine")


@dataclass
class StereoPredictor:
    """A loaded model of any kind, run on one RGB pair (H x W x 3 uint8) at a time."""

    kind: str
    description: str
    device: str
    resolved: ResolvedModel
    iters: int | None = None
    hierarchical: bool = False
    mixed_precision: bool | None = None
    _runner: object | None = None

    @property
    def where(self) -> str:
        """Which runtime runs the model, and on what device."""
        runtime = {"onnx": "ONNX Runtime", "engine": "TensorRT"}.get(self.kind, "PyTorch")
        return f"{runtime} on {self.device}"

    def __call__(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """Disparity (H x W float32, pixels, left view) of a rectified RGB pair."""
        if self._runner is not None:
            return np.asarray(self._runner(left, right), dtype=np.float32)

        disp = infer(self.resolved.module, left, right, iters=self.iters, mixed_precision=self.mixed_precision,
                     hierarchical=self.hierarchical)
        return disp[0, 0].float().cpu().numpy()


def _default_device(kind: str, requested: str | None) -> str:
    if requested:
        return requested
    if kind == "onnx":
        return "cpu"  # ONNX Runtime's CPU provider is always there; CUDA needs onnxruntime-gpu
    return "cuda" if torch.cuda.is_available() else "cpu"


def open_predictor(
    spec: str | os.PathLike,
    config: str | None = None,
    device: str | None = None,
    iters: int | None = None,
    hierarchical: bool = False,
    mixed_precision: bool | None = None,
    trust_checkpoint: bool = False,
) -> StereoPredictor:
    """Load whatever ``spec`` names (checkpoint, student directory, ONNX file or engine) for inference."""
    path = Path(spec)
    if not path.exists():
        raise ConfigError(
            f"--model {spec}: no such file or directory; expected a FoundationStereo checkpoint "
            f"({', '.join(CHECKPOINT_SUFFIXES)}, cfg.yaml beside it), a student directory, an .onnx file or a "
            f"TensorRT engine ({', '.join(ENGINE_SUFFIXES)})")
    resolved = resolve_model(str(path), config, trust_checkpoint, allow_files=True)
    if resolved.kind not in INFER_KINDS:
        raise ConfigError(f"--model {spec} is a {resolved.kind}; inference needs trained weights")
    dev = _default_device(resolved.kind, device)
    if resolved.module is None:  # an exported file: precision and iteration count were fixed at export
        if hierarchical:
            raise ConfigError("--hierarchical runs two passes of a PyTorch model; an exported model runs one")
        if mixed_precision is not None:
            raise ConfigError("--mixed-precision does not apply to an exported model: its precision is fixed at "
                              "export")
        # compress.export loads onnx (about 1.5 s): kept out of import compress.deploy and ffsc --help
        from compress.export.exported import ExportedStereo

        runner = ExportedStereo(path, dev)
        if iters is not None and runner.iters is not None and iters != runner.iters:
            raise ConfigError(f"{path} was exported with {runner.iters} iterations (fixed at export), --iters "
                              f"{iters} was asked; drop --iters or re-export")
        return StereoPredictor(resolved.kind, resolved.description, dev, resolved, runner.iters, _runner=runner)
    if iters is not None and iters < 1:
        raise ConfigError(f"--iters {iters}: need at least 1 GRU iteration")
    resolved.module = resolved.module.to(dev).eval()
    return StereoPredictor(resolved.kind, resolved.description, dev, resolved,
                           iters if iters is not None else resolved.default_iters, hierarchical, mixed_precision)
