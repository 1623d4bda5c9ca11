"""Lazy TensorRT import and the CUDA checks every TensorRT path starts with."""

from __future__ import annotations

from types import ModuleType

import torch

from compress.errors import ConfigError, MissingDependencyError


def import_tensorrt() -> ModuleType:
    """The tensorrt module, or MissingDependencyError saying how to get it."""
    try:
        # tensorrt is an optional extra (ffsc[tensorrt]), absent on most machines
        import tensorrt
    except ImportError as err:
        raise MissingDependencyError(
            "TensorRT is not installed: `pip install tensorrt` (or install ffsc with the `ffsc[tensorrt]` "
            "extra); TensorRT also needs an NVIDIA CUDA GPU") from err
    return tensorrt


def require_cuda(what: str) -> None:
    """Raise MissingDependencyError unless PyTorch sees a CUDA GPU."""
    if not torch.cuda.is_available():
        raise MissingDependencyError(f"{what} needs an NVIDIA CUDA GPU, and torch.cuda.is_available() is False; "
                                     "run on a machine with a GPU and a CUDA build of PyTorch")


def trt_major(trt: ModuleType) -> int:
    """Major version of the imported TensorRT."""
    return int(str(trt.__version__).split(".")[0])


def cuda_index(device: int | str | torch.device | None = None) -> int:
    """The CUDA device index a device spec names; None or a bare 'cuda' is the current device."""
    if isinstance(device, int):
        return device
    if device is None:
        return torch.cuda.current_device()
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ConfigError(f"TensorRT runs on a CUDA device, got '{device}'")
    return dev.index if dev.index is not None else torch.cuda.current_device()


def gpu_identity(device: int | str | torch.device | None = None) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of a CUDA device (default: the current one)."""
    index = cuda_index(device)
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"
