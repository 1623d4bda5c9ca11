"""An exported stereo model (ONNX or TensorRT engine) run on images of any size, padded as PyTorch pads them."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from compress.errors import DataError, ExportError
from compress.export.onnx_export import (
    NOT_FFSC,
    check_stereo_onnx,
    exported_by_ffsc,
    load_graph,
    read_metadata,
    static_input_size,
)
from compress.export.runtime import run_onnx
from compress.export.trt_runner import TensorRTRunner
from teacher.inference import to_image_batch


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
        self.ours = True  # exported by ffsc: re-exporting it is a remedy
        if self.is_engine:
            self.runner = TensorRTRunner(self.path, device=self.device)
            self.iters = self.runner.info.iters if self.runner.info is not None else None
            if self.runner.info is not None:
                low, _, high = next(iter(self.runner.info.shapes.values()))
                self.min_size, self.max_size = (low[2], low[3]), (high[2], high[3])
        else:
            proto = load_graph(self.path)
            check_stereo_onnx(proto, self.path)
            self.min_size = self.max_size = static_input_size(proto)
            meta = read_metadata(proto)
            self.ours = exported_by_ffsc(meta)
            self.iters = int(meta["iters"]) if meta.get("iters") else None

    @property
    def static_size(self) -> tuple[int, int] | None:
        """(height, width) the model accepts when it has a single input size, else None."""
        return self.min_size if self.min_size is not None and self.min_size == self.max_size else None

    def _target(self, height: int, width: int) -> tuple[int, int]:
        static = self.static_size
        if static is not None:
            if height > static[0] or width > static[1]:
                raise DataError(
                    f"the images are {height}x{width} (height x width) but {self.path} takes exactly "
                    f"{static[0]}x{static[1]} (a static shape); " + (
                        f"re-export with --height {-(-height // 32) * 32} --width {-(-width // 32) * 32} or with "
                        "--dynamic" if self.ours else f"it {NOT_FFSC}: shrink the images to fit (--scale)"))
            return static
        target = (-(-height // 32) * 32, -(-width // 32) * 32)
        low, high = self.min_size, self.max_size
        if low is not None and high is not None and not (
                low[0] <= target[0] <= high[0] and low[1] <= target[1] <= high[1]):
            raise DataError(f"the padded images are {target[0]}x{target[1]} (height x width), outside the engine's "
                            f"size range {low[0]}x{low[1]}..{high[0]}x{high[1]}; rebuild "
                            "it with a profile that covers this size")
        return target

    def __call__(self, left, right):
        """Disparity (H x W float32 numpy) of an RGB pair (H x W x 3 arrays or 3 x H x W tensors, 0..255)."""
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
            disp = run_onnx(self.path, left_t, right_t, device=self.device)
        return disp[0, 0, pad[2]: pad[2] + h, pad[0]: pad[0] + w]
