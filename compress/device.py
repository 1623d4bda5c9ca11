"""The one device picker: a named device (checked), else this process's GPU when there is one, else the CPU."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from compress.errors import ConfigError

if TYPE_CHECKING:  # imported where used: the command line picks devices without torch at start-up
    import torch


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """``name``, or ``cuda:LOCAL_RANK`` (the process's GPU under torchrun) when CUDA is available, else cpu."""
    import torch

    if name is None or str(name) == "cuda":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if name is None:
            return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a torch device; expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(name)!r} requested but CUDA is not available; use device=cpu")
    return device
