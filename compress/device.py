"""The one device picker: a named device (checked), else this process's GPU when there is one, else the CPU."""

from __future__ import annotations

import os

import torch

from compress.errors import ConfigError


def local_cuda_index() -> int:
    """This process's GPU: ``LOCAL_RANK`` under torchrun, or 0 where the launcher shows each process one GPU."""
    local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local < count:
        return local
    if count == 1:  # CUDA_VISIBLE_DEVICES (or a scheduler) gave this process its own GPU: it is cuda:0 here
        return 0
    raise ConfigError(f"LOCAL_RANK={local} but this process sees {count} GPU(s) (CUDA_VISIBLE_DEVICES="
                      f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); launch one process per visible GPU")


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """``name``, or this process's GPU (``LOCAL_RANK`` under torchrun) when CUDA is available, else cpu."""
    if name is None or str(name) == "cuda":
        if torch.cuda.is_available():
            return torch.device("cuda", local_cuda_index())
        if name is None:
            return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a torch device; expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(name)!r} requested but CUDA is not available; use device=cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {str(name)!r}: this process sees {torch.cuda.device_count()} GPU(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same one (``cuda`` means the current GPU, so ``cuda`` and ``cuda:1`` may differ)."""
    def canonical(d: torch.device) -> torch.device:
        if d.type == "cuda" and d.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return d

    return a.type == b.type and (a.type != "cuda" or canonical(a) == canonical(b))
