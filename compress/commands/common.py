"""Helpers shared by the subcommands (the library's own helpers live below compress/commands)."""

from __future__ import annotations

from compress.terminal import console

__all__ = ["console", "pick_device"]


def pick_device(name: str | None) -> str:
    """The requested device, else CUDA when there is one, else the CPU."""
    import torch

    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"
