"""Per-iteration geometry lookup: the filtered cost volume and all-pairs correlation around the disparity."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .layers import Float32Island, fp32_region


def _sample_rows(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of N x C x 1 x L rows at N x 1 x K x 1 pixel positions (zero outside).

    A 4-D ``grid_sample`` with align_corners=True: TensorRT runs it (a 5-D one it cannot).
    """
    length = rows.shape[-1]
    gx = 2 * x / (length - 1) - 1
    grid = torch.cat([gx, torch.zeros_like(gx)], dim=-1).to(rows.dtype)
    return F.grid_sample(rows, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def all_pairs_correlation(fmap1: torch.Tensor, fmap2: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every left pixel with every right pixel of the same row: B x H x W1 x W2."""
    with fp32_region(fmap1.device):
        f1 = F.normalize(fmap1.float(), dim=1)
        f2 = F.normalize(fmap2.float(), dim=1)
        return torch.einsum("bchw,bchv->bhwv", f1, f2)


class PairCorrelation(Float32Island):
    """:func:`all_pairs_correlation` as a module, so its exported nodes carry a name scope (kept float32 in fp16)."""

    def forward(self, fmap1: torch.Tensor, fmap2: torch.Tensor) -> torch.Tensor:
        """B x H x W1 x W2 cosine similarities."""
        return all_pairs_correlation(fmap1, fmap2)


class GeometryEncoding:
    """The two lookup pyramids, built once per image pair (:meth:`build`); ``lookup(disp)`` samples them.

    Channels per level: the volume's C channels x (2r+1) taps (channel-major), then (2r+1) correlation
    taps; levels concatenated finest first. The pyramids are plain tensors, so a stage timed on its own can
    receive them as inputs and wrap them again.
    """

    def __init__(self, volume_pyramid: list[torch.Tensor], corr_pyramid: list[torch.Tensor], radius: int) -> None:
        self.volume_pyramid, self.corr_pyramid = list(volume_pyramid), list(corr_pyramid)
        self.num_levels, self.radius = len(self.volume_pyramid), radius
        width, device = corr_pyramid[0].shape[-1], corr_pyramid[0].device  # all-pairs: as wide as the image row
        # Offsets built on the input's device: no host-to-device copy inside the iteration loop.
        self.dx = torch.linspace(-radius, radius, 2 * radius + 1, device=device).reshape(1, 1, 2 * radius + 1, 1)
        self.coords = torch.arange(width, dtype=torch.float32, device=device).reshape(1, 1, width, 1)

    @classmethod
    def build(cls, fmap1: torch.Tensor, fmap2: torch.Tensor, volume: torch.Tensor, num_levels: int, radius: int,
              correlation: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = all_pairs_correlation,
              ) -> GeometryEncoding:
        """Pyramids of the filtered volume and of the features' all-pairs ``correlation`` (models pass their
        :class:`PairCorrelation` module so the exported nodes are named after it)."""
        b, c, d, h, w = volume.shape
        vol = volume.permute(0, 3, 4, 1, 2).reshape(b * h * w, c, 1, d)
        corr = correlation(fmap1, fmap2).reshape(b * h * w, 1, 1, -1)
        volume_pyramid, corr_pyramid = [vol], [corr]
        for _ in range(num_levels - 1):
            volume_pyramid.append(F.avg_pool2d(volume_pyramid[-1], [1, 2], stride=[1, 2]))
            corr_pyramid.append(F.avg_pool2d(corr_pyramid[-1], [1, 2], stride=[1, 2]))
        return cls(volume_pyramid, corr_pyramid, radius)

    def lookup(self, disp: torch.Tensor) -> torch.Tensor:
        """Geometry feature B x C_geo x H x W around the current disparity (B x 1 x H x W, float32)."""
        b, _, h, w = disp.shape
        disp_flat = disp.reshape(b * h * w, 1, 1, 1)
        coords = self.coords.expand(b, h, w, 1).reshape(b * h * w, 1, 1, 1)
        out = []
        for i in range(self.num_levels):
            scale = 2**i
            vol = _sample_rows(self.volume_pyramid[i], self.dx + disp_flat / scale)
            corr = _sample_rows(self.corr_pyramid[i], coords / scale - disp_flat / scale + self.dx)
            out.append(vol.reshape(b, h, w, -1))
            out.append(corr.reshape(b, h, w, -1))
        return torch.cat(out, dim=-1).permute(0, 3, 1, 2).contiguous()
