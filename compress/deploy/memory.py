"""Peak memory of one PyTorch stereo inference, estimated before it runs and compared with what is free.

The estimate scales with the padded image. Two stages peak: the 3D cost-volume stage, over disparities/s x
H/s x W/s voxels (s the volume scale), and the 2D stages over the image pixels; the estimate is the larger.
Constants, measured on CPU (PyTorch 2, one thread, peak RSS growth of one pass at 256x512 of the tiny,
small_eighth, standin_teacher and fast_foundationstereo presets and a vitt teacher; each within 10%):

* CPU, volume stage: 100 bytes per voxel per volume channel. The first 3x3x3 convolution unfolds its
  input (27 values of 4 bytes per channel), which outweighs the volume itself.
* 2D stages: 1500 bytes per image pixel.
* CUDA (not measured here): 3D convolutions do not unfold, so the volume stage counts the tensors alive at
  once (the correlation volume and four volume-wide tensors) in the autocast dtype; the 2D constant is the
  CPU one, scaled by that dtype.

Exported models (ONNX, TensorRT) carry no model config and are not estimated.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from compress.errors import DataError

CPU_BYTES_PER_VOXEL_CHANNEL = 100
BYTES_PER_PIXEL = 1500
CUDA_VOLUME_TENSORS = 4
STRIDE = 32  # images are padded to a multiple of this before the model sees them


def _volume_shape(module) -> tuple[int, int, int, int] | None:
    """(volume scale, disparities at image scale, correlation channels, volume channels) of a stereo module."""
    cfg = getattr(module, "cfg", None)
    max_disp = getattr(module, "max_disp", None) or getattr(cfg, "max_disp", None)
    scale = getattr(module, "volume_scale", None)
    # The first 3D convolution turns the correlation volume into the volume the 3D stage works on.
    conv = next((m for m in module.modules() if isinstance(m, nn.Conv3d)), None)
    if not isinstance(max_disp, int) or not isinstance(scale, int) or conv is None:
        return None
    return scale, max_disp, conv.in_channels, conv.out_channels


def estimate_peak_bytes(module, height: int, width: int, device: str = "cpu", fp16: bool = False) -> int:
    """Memory one pass of ``module`` adds at height x width (see the module docstring for the constants)."""
    padded_h, padded_w = -(-height // STRIDE) * STRIDE, -(-width // STRIDE) * STRIDE
    cuda = device.startswith("cuda")
    element = 2 if cuda and fp16 else 4
    planar = padded_h * padded_w * BYTES_PER_PIXEL * (element / 4 if cuda else 1)
    shape = _volume_shape(module)
    if shape is None:
        return int(planar)
    scale, max_disp, corr_channels, channels = shape
    voxels = (max_disp // scale) * (padded_h // scale) * (padded_w // scale)
    per_voxel = (corr_channels + CUDA_VOLUME_TENSORS * channels) * element if cuda \
        else CPU_BYTES_PER_VOXEL_CHANNEL * channels
    return int(max(planar, voxels * per_voxel))


def _cgroup_headroom() -> int | None:
    """Bytes left under this process's cgroup (v2) memory limit, where one is set."""
    root = Path("/sys/fs/cgroup")
    try:
        limit, used = (root / "memory.max").read_text().strip(), (root / "memory.current").read_text().strip()
    except OSError:
        return None
    return int(limit) - int(used) if limit.isdigit() and used.isdigit() else None


def host_available_bytes() -> int | None:
    """RAM available to new work: MemAvailable (Linux's own estimate, page cache included), else free pages;
    capped by a cgroup limit."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return None
    headroom = _cgroup_headroom()
    return min(available, headroom) if headroom is not None else available


def available_bytes(device: str) -> tuple[int, str] | None:
    """(bytes free for one pass on device, what that is), or None where it cannot be told."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return free, f"free on {dev}"
    if dev.type == "cpu":
        available = host_available_bytes()
        return (available, "RAM available") if available is not None else None
    return None


def _amount(size: int) -> str:
    """Bytes in GiB, or MiB below one GiB."""
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def _largest_scale(scale: float, estimate: int, available: int) -> float:
    """The largest --scale (0.05 steps) that fits: the estimate grows with the pixel count, the square of it."""
    return math.floor(scale * math.sqrt(available / estimate) * 20) / 20


def check_memory(predictor, height: int, width: int, scale: float = 1.0) -> None:
    """DataError, before inference, when a pass at height x width is estimated not to fit in the free memory."""
    module = predictor.resolved.module
    if module is None:  # an exported model: no config to estimate from
        return
    free = available_bytes(predictor.device)
    if free is None:
        return
    cfg = getattr(module, "cfg", None)
    fp16 = predictor.mixed_precision if predictor.mixed_precision is not None \
        else bool(getattr(cfg, "mixed_precision", False))
    estimate = estimate_peak_bytes(module, height, width, predictor.device, fp16)
    available, what = free
    if estimate <= available:
        return
    smaller = _largest_scale(scale, estimate, available)
    hint = f"--scale {smaller:g} or less" if smaller >= 0.05 else "a much smaller --scale"
    raise DataError(f"a {height}x{width} (height x width) pair needs about {_amount(estimate)} on {predictor.device} "
                    f"(an estimate) but {_amount(available)} is {what}; pass {hint}, or use a machine with more memory "
                    "(--hierarchical does not help: its second pass is full size)")
