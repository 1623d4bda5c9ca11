"""Parameter and MAC counts for any stereo model (teacher or student) at a given input size.

MACs come from PyTorch's FlopCounterMode (convolutions 2D/3D and transposed, matmuls, scaled-dot-product
attention) during a real forward pass on the meta device, plus the group-wise correlation volume, which
is an element-wise product and sum that FLOP counters skip: one MAC per feature channel, disparity and
pixel.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from teacher.inference import model_iters


@dataclass
class ModelCost:
    """Size and compute of one model at one input size."""

    params: int
    macs: int
    macs_by_module: dict[str, int]
    correlation_macs: int
    height: int
    width: int
    iters: int

    @property
    def gmacs(self) -> float:
        """MACs in units of 1e9."""
        return self.macs / 1e9

    def to_dict(self) -> dict:
        """Plain dict with derived units."""
        return {**asdict(self), "gmacs": self.gmacs, "mparams": self.params / 1e6}


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _correlation_macs(model: nn.Module, height: int, width: int, batch: int) -> int:
    cfg = model.cfg
    scale = getattr(model, "volume_scale", 4)
    h, w = height // scale, width // scale
    d = cfg.max_disp // scale
    if hasattr(model, "base"):  # student: correlation on the pyramid level at the volume's resolution
        channels = model.feature.d_out[model.base]
    else:
        channels = model.feature.d_out[0]
    # all-pairs correlation for the geometry lookup is an einsum (counted as bmm by FlopCounterMode)
    return batch * channels * d * h * w


def count_macs(model: nn.Module, height: int, width: int, iters: int | None = None, batch: int = 1) -> ModelCost:
    """MACs of one forward in test mode at ``height`` x ``width`` with ``iters`` GRU iterations."""
    if height % 32 or width % 32:
        raise ValueError(f"input size {height}x{width} must be divisible by 32")
    if iters is None:
        iters = model_iters(model)  # the one rule (the official teacher: valid_iters)
    params = count_params(model)
    # Count on the meta device: shapes only, no memory, no arithmetic.
    meta = copy.deepcopy(model).to("meta").eval()
    if getattr(meta, "cfg", None) is not None and hasattr(meta.cfg, "mixed_precision"):
        meta.cfg = copy.copy(meta.cfg)
        meta.cfg.mixed_precision = False
    left = torch.empty(batch, 3, height, width, device="meta")
    counter = FlopCounterMode(display=False, depth=2)
    with counter, torch.no_grad():
        meta(left, left, iters=iters, test_mode=True)
    by_module = {k: int(sum(v.values()) // 2) for k, v in counter.get_flop_counts().items() if k != "Global"}
    corr = _correlation_macs(model, height, width, batch)
    total = counter.get_total_flops() // 2 + corr
    return ModelCost(params, int(total), by_module, corr, height, width, iters)
