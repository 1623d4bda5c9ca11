"""A tiny stereo network with the family's model contract, for export and latency tests.

It exercises the ops the real teacher/students export: strided convs, an L2-normalised group-wise
correlation volume built by shifting, a 3-D conv filter, softmax soft-argmin, an iteration loop of a
conv update that looks the volume up with a 4-D grid_sample, and a bilinear upsample. It is a test
helper only, used until the real model family exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from teacher.outputs import StereoOutput


@dataclass
class ToyStereoConfig:
    """Widths and ranges of the toy network."""

    feat_dim: int = 8
    groups: int = 2
    max_disp: int = 8
    """Disparity levels at 1/4 resolution (so up to 4 * max_disp full-resolution pixels)."""
    hidden_dim: int = 8
    lookup_radius: int = 1
    iters: int = 4
    """Refinement steps at inference (every model of the family answers ``cfg.iters``)."""


class FeatureNorm(nn.Module):
    """L2 normalisation over channels: an explicit module so the exported nodes are named
    "*/corr_norm*/*" and an fp16 cast can keep them in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x / ||x|| along channels."""
        return F.normalize(x, dim=1)


class ToyStereo(nn.Module):
    """Stereo network small enough to export and time in a second on a CPU."""

    def __init__(self, cfg: ToyStereoConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or ToyStereoConfig()
        c = self.cfg
        if c.feat_dim % c.groups:
            raise ValueError(f"feat_dim {c.feat_dim} must be divisible by groups {c.groups}")
        self.feature = nn.Sequential(
            nn.Conv2d(3, c.feat_dim, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(c.feat_dim, c.feat_dim, 3, stride=2, padding=1),
        )
        self.corr_norm = FeatureNorm()
        self.corr_filter = nn.Conv3d(c.groups, 1, 3, padding=1)
        self.context = nn.Conv2d(c.feat_dim, c.hidden_dim, 3, padding=1)
        n_lookup = 2 * c.lookup_radius + 1
        self.update = nn.Conv2d(c.hidden_dim + n_lookup + 1, c.hidden_dim, 3, padding=1)
        self.delta = nn.Conv2d(c.hidden_dim, 1, 3, padding=1)
        # Buffers, not tensors made in forward, so the forward is capture-safe.
        self.register_buffer("disp_values", torch.arange(c.max_disp, dtype=torch.float32).view(1, -1, 1, 1))
        offsets = torch.arange(-c.lookup_radius, c.lookup_radius + 1, dtype=torch.float32)
        self.register_buffer("lookup_offsets", offsets.view(1, 1, -1, 1))

    def _correlation(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """Group-wise correlation of normalised features, B x G x D x h x w."""
        c = self.cfg
        left = self.corr_norm(left)
        right = self.corr_norm(right)
        b, ch, h, w = left.shape
        slices = []
        for d in range(c.max_disp):
            shifted = F.pad(right[..., : w - d], (d, 0)) if d else right
            prod = (left * shifted).view(b, c.groups, ch // c.groups, h, w)
            slices.append(prod.mean(dim=2))
        return torch.stack(slices, dim=2)

    def _lookup(self, logits: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
        """Sample the cost logits at disp + offsets along the disparity axis (4-D grid_sample)."""
        b, d, h, w = logits.shape
        volume = logits.permute(0, 2, 3, 1).reshape(b * h * w, 1, 1, d)
        x = disp.permute(0, 2, 3, 1).reshape(b * h * w, 1, 1, 1) + self.lookup_offsets
        x = 2.0 * x / (d - 1) - 1.0
        grid = torch.cat([x, torch.zeros_like(x)], dim=-1)
        sampled = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return sampled.view(b, h, w, -1).permute(0, 3, 1, 2)

    def forward(
        self,
        image1: torch.Tensor,
        image2: torch.Tensor,
        iters: int = 4,
        test_mode: bool = False,
        return_intermediates: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]] | StereoOutput:
        """Disparity of image1 against image2 (B x 3 x H x W in 0..255)."""
        left = self.feature(image1 / 127.5 - 1.0)
        right = self.feature(image2 / 127.5 - 1.0)
        volume = self._correlation(left, right)
        logits = self.corr_filter(volume).squeeze(1)
        prob = torch.softmax(logits, dim=1)
        init_disp = (prob * self.disp_values).sum(dim=1, keepdim=True)
        hidden = torch.tanh(self.context(left))
        disp = init_disp
        preds, lowres = [], []
        for _ in range(iters):
            looked = self._lookup(logits, disp)
            hidden = torch.tanh(self.update(torch.cat([hidden, looked, disp], dim=1)))
            disp = disp + self.delta(hidden)
            lowres.append(disp)
            preds.append(4.0 * F.interpolate(disp, scale_factor=4, mode="bilinear", align_corners=False))
        if not preds:
            preds.append(4.0 * F.interpolate(disp, scale_factor=4, mode="bilinear", align_corners=False))
        if return_intermediates:
            return StereoOutput(
                disp=preds[-1], init_disp=init_disp, disp_preds=preds, features_left=[left],
                features_right=[right], cost_volume=volume, cost_logits=logits, disp_lowres=lowres,
            )
        if test_mode:
            return preds[-1]
        return init_disp, preds


def make_toy(seed: int = 0, **cfg_overrides: int) -> ToyStereo:
    """A toy model with deterministic random weights, in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ToyStereo(ToyStereoConfig(**cfg_overrides)).eval()
