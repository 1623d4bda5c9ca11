"""The settings of INT8 post-training quantization: the ``quantize`` block of a recipe's export stage."""

from __future__ import annotations

from dataclasses import dataclass, field

from compress.errors import ConfigError

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
