"""The deterministic weight rule of the FoundationStereo reference runs (key name + shape only).

Each entry gets values from a CPU generator seeded with crc32(key); aliased BatchNorm pairs take the
``downsample.1`` key's values. Used to reproduce the reference runs in tests/data.
"""

from __future__ import annotations

import math
import zlib

import torch


def rule_tensor(key: str, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The reference value of one state-dict entry."""
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    g = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
    u = 2 * torch.rand(shape, generator=g, dtype=torch.float32) - 1
    if len(shape) >= 2:
        return u * (1 / math.sqrt(math.prod(shape[1:])))
    if key.endswith(("weight", "gamma", "running_var")):
        return 1 + 0.1 * u
    return 0.1 * u


def rule_state_dict(template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with the template's keys and shapes, filled by the reference rule."""
    out = {k: rule_tensor(k, list(v.shape), v.dtype) for k, v in template.items()}
    for key in out:
        if ".norm3." in key:
            alias = key.replace(".norm3.", ".downsample.1.")
            if alias in out:
                out[key] = out[alias].clone()
    return out
