"""The machine latency numbers are measured on: CPU and GPU names, library versions, a file-name-safe slug."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

import torch


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def installed_version(*distributions: str) -> str | None:
    """The version of the first of ``distributions`` that is installed, or None."""
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def machine_info() -> dict[str, object]:
    """The hardware and library versions latency numbers are measured with, for reports."""
    return {
        "cpu": _cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__,
        "onnxruntime": installed_version("onnxruntime", "onnxruntime-gpu"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "tensorrt": installed_version("tensorrt"),
    }


def machine_slug(info: dict[str, object] | None = None) -> str:
    """A file-name-safe machine name for result files: the GPU if there is one, else the CPU and its cores."""
    info = info or machine_info()
    name = str(info["gpu"]) if info.get("gpu") else f"{info['cpu']}-{info['cores']}cores"
    for noise in ("(R)", "(TM)", "CPU", "Processor", "NVIDIA"):
        name = name.replace(noise, " ")
    return "-".join("".join(c if c.isalnum() else " " for c in name).lower().split())


def device_name(device: torch.device, threads: int | None = None) -> str:
    """Human-readable hardware name for reports and cache keys (CPU names include the thread count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({threads if threads is not None else 'default'} threads)"
