"""Recurrent refinement: motion encoder, selective multi-level ConvGRUs and convex upsampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Conv2x, EdgeNextConvEncoder, Float32Island, fp32_region


class BasicMotionEncoder(nn.Module):
    """Encodes the geometry feature and the current disparity; the disparity is appended unchanged."""

    def __init__(
        self, geo_planes: int, out_dim: int = 128, corr_dims=(256, 256), disp_dims=(64, 64), conv_kernel: int = 3
    ) -> None:
        super().__init__()
        self.convc1 = nn.Conv2d(geo_planes, corr_dims[0], 1, padding=0)
        self.convc2 = nn.Conv2d(corr_dims[0], corr_dims[1], 3, padding=1)
        self.convd1 = nn.Conv2d(1, disp_dims[0], 7, padding=3)
        self.convd2 = nn.Conv2d(disp_dims[0], disp_dims[1], 3, padding=1)
        # FoundationStereo mixes with a 3x3 conv, Fast-FoundationStereo with a 1x1.
        self.conv = nn.Conv2d(corr_dims[1] + disp_dims[1], out_dim - 1, conv_kernel, padding=conv_kernel // 2)

    @property
    def out_dim(self) -> int:
        """Width of the motion feature (conv output + the disparity channel)."""
        return self.conv.out_channels + 1

    def forward(self, disp: torch.Tensor, geo: torch.Tensor) -> torch.Tensor:
        cor = F.relu(self.convc2(F.relu(self.convc1(geo))))
        d = F.relu(self.convd2(F.relu(self.convd1(disp))))
        out = F.relu(self.conv(torch.cat([cor, d], dim=1)))
        return torch.cat([out, disp], dim=1)


class RaftConvGRU(nn.Module):
    """ConvGRU whose gates read a precomputed hidden+input feature ``hx``."""

    def __init__(self, hidden_dim: int, input_dim: int, kernel_size: int, gate_in: int | None = None) -> None:
        super().__init__()
        gate_in = hidden_dim + input_dim if gate_in is None else gate_in
        pad = kernel_size // 2
        self.convz = nn.Conv2d(gate_in, hidden_dim, kernel_size, padding=pad)
        self.convr = nn.Conv2d(gate_in, hidden_dim, kernel_size, padding=pad)
        self.convq = nn.Conv2d(hidden_dim + input_dim, hidden_dim, kernel_size, padding=pad)

    def forward(self, h: torch.Tensor, x: torch.Tensor, hx: torch.Tensor) -> torch.Tensor:
        z = torch.sigmoid(self.convz(hx))
        r = torch.sigmoid(self.convr(hx))
        q = torch.tanh(self.convq(torch.cat([r * h, x], dim=1)))
        return (1 - z) * h + z * q


class SelectiveConvGRU(nn.Module):
    """A 1x1 and a 3x3 GRU whose outputs are blended by a spatial attention map."""

    def __init__(self, hidden_dim: int, input_dim: int, mid_dim: int | None = None) -> None:
        super().__init__()
        mid = input_dim if mid_dim is None else mid_dim
        self.conv0 = nn.Sequential(nn.Conv2d(input_dim, mid, kernel_size=3, padding=1), nn.ReLU())
        self.conv1 = nn.Sequential(nn.Conv2d(mid + hidden_dim, mid + hidden_dim, kernel_size=3, padding=1), nn.ReLU())
        self.small_gru = RaftConvGRU(hidden_dim, mid, 1)
        self.large_gru = RaftConvGRU(hidden_dim, mid, 3)

    def forward(self, att: torch.Tensor, h: torch.Tensor, *x: torch.Tensor) -> torch.Tensor:
        x = self.conv0(torch.cat(x, dim=1))
        hx = self.conv1(torch.cat([x, h], dim=1))
        return self.small_gru(h, x, hx) * att + self.large_gru(h, x, hx) * (1 - att)


class DispHead(nn.Module):
    """Predicts the disparity update from the finest hidden state."""

    def __init__(self, input_dim: int, blocks: int = 2, out_dim: int = 1) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(input_dim, input_dim, kernel_size=3, padding=1),
            nn.ReLU(),
            *[EdgeNextConvEncoder(input_dim, expan_ratio=4, kernel_size=7) for _ in range(blocks)],
            nn.Conv2d(input_dim, out_dim, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def pool2x(x: torch.Tensor) -> torch.Tensor:
    """3x3 average pool, stride 2 (one level coarser)."""
    return F.avg_pool2d(x, 3, stride=2, padding=1)


def interp(x: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """Bilinear (align_corners) resize of x to dest's spatial size."""
    return F.interpolate(x, dest.shape[2:], mode="bilinear", align_corners=True)


class SelectiveMultiUpdateBlock(nn.Module):
    """One refinement iteration over 1-3 GRU levels (1/4, 1/8, 1/16), coarsest updated first.

    ``hidden_dims`` and ``context_dims`` are per level, finest first.
    """

    def __init__(
        self,
        hidden_dims: list[int],
        context_dims: list[int],
        geo_planes: int,
        motion_dim: int = 128,
        corr_dims=(256, 256),
        disp_dims=(64, 64),
        head_blocks: int = 2,
        mask_dims=(64, 32),
        motion_conv_kernel: int = 3,
    ) -> None:
        super().__init__()
        n = len(hidden_dims)
        self.n_levels = n
        self.encoder = BasicMotionEncoder(geo_planes, motion_dim, corr_dims, disp_dims, motion_conv_kernel)
        h = hidden_dims

        def gru_input(level: int) -> int:
            dim = context_dims[level] + (motion_dim if level == 0 else h[level - 1])
            return dim + (h[level + 1] if level + 1 < n else 0)

        if n == 3:
            self.gru16 = SelectiveConvGRU(h[2], gru_input(2))
        if n >= 2:
            self.gru08 = SelectiveConvGRU(h[1], gru_input(1))
        self.gru04 = SelectiveConvGRU(h[0], gru_input(0))
        self.disp_head = DispHead(h[0], head_blocks)
        self.mask = nn.Sequential(
            nn.Conv2d(h[0], mask_dims[0], 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(mask_dims[0], mask_dims[1], 3, padding=1),
            nn.ReLU(),
        )

    def forward(
        self,
        net: list[torch.Tensor],
        inp: list[torch.Tensor],
        geo: torch.Tensor,
        disp: torch.Tensor,
        att: list[torch.Tensor],
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """New hidden states, the upsampling-mask feature and the disparity update."""
        net = list(net)
        n = self.n_levels
        if n == 3:
            net[2] = self.gru16(att[2], net[2], inp[2], pool2x(net[1]))
        if n >= 2:
            extra = [interp(net[2], net[1])] if n > 2 else []
            net[1] = self.gru08(att[1], net[1], inp[1], pool2x(net[0]), *extra)
        motion = torch.cat([inp[0], self.encoder(disp, geo)], dim=1)
        extra = [interp(net[1], net[0])] if n > 1 else []
        net[0] = self.gru04(att[0], net[0], motion, *extra)
        delta = self.disp_head(net[0])
        # The official model scales the mask feature to balance gradients.
        mask = 0.25 * self.mask(net[0])
        return net, mask, delta


def context_upsample(disp_low: torch.Tensor, up_weights: torch.Tensor, factor: int) -> torch.Tensor:
    """Convex combination of each low-res pixel's 3x3 neighbourhood with per-pixel softmax weights."""
    b, _, h, w = disp_low.shape
    unfold = F.unfold(disp_low, 3, 1, 1).reshape(b, 9, h, w)
    unfold = F.interpolate(unfold, (h * factor, w * factor), mode="nearest")
    return (unfold * up_weights).sum(1, keepdim=True)


class DisparityUpdate(Float32Island):
    """The disparity accumulator ``disp + delta``, in float32: in fp16, values above 256 px sit 0.25 px apart."""

    def forward(self, disp: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The updated disparity (float32)."""
        with fp32_region(disp.device):
            return disp.float() + delta.float()


class ConvexCombination(Float32Island):
    """Softmax of the upsampling logits and the convex combination of each 3x3 neighbourhood, in float32.

    Its output is the full-resolution disparity: in an fp16 graph the weights' rounding and the sum's spacing
    (0.25 px above 256 px) would land directly in the result.
    """

    def forward(self, disp_low: torch.Tensor, logits: torch.Tensor, factor: int) -> torch.Tensor:
        """Full-resolution disparity (float32) from the volume-resolution one and 9 logits per output pixel."""
        with fp32_region(disp_low.device):
            return context_upsample(disp_low.float() * factor, F.softmax(logits.float(), 1), factor)


class ConvexUpsampler(nn.Module):
    """Mask feature at volume resolution + 1/2-res stem feature -> 9 softmax weights per output pixel."""

    def __init__(self, mask_dim: int = 32, stem_dim: int = 32, factor: int = 4) -> None:
        super().__init__()
        self.factor = factor
        self.spx_2_gru = Conv2x(mask_dim, stem_dim)
        self.spx_gru = nn.Sequential(nn.ConvTranspose2d(2 * stem_dim, 9, kernel_size=4, stride=2, padding=1))

    def logits(self, mask_feat: torch.Tensor, stem_2x: torch.Tensor) -> torch.Tensor:
        """The 9 combination logits per full-resolution pixel."""
        return self.spx_gru(self.spx_2_gru(mask_feat, stem_2x))

    def forward(self, disp: torch.Tensor, mask_feat: torch.Tensor, stem_2x: torch.Tensor) -> torch.Tensor:
        """Full-resolution disparity."""
        return context_upsample(disp * self.factor, F.softmax(self.logits(mask_feat, stem_2x), 1), self.factor)
