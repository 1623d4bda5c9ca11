"""Hybrid cost volume (group-wise correlation + concatenation) and its filtering (APC hourglass)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import BasicConv, Conv3dNormActReduced, CostVolumeDisparityAttention, FeatureAtt


def _shift_right(x: torch.Tensor, d: int) -> torch.Tensor:
    """x shifted right by d pixels along width, zero-filled on the left (x[..., w] -> x[..., w + d])."""
    if d == 0:
        return x
    if d >= x.shape[-1]:
        return torch.zeros_like(x)
    return F.pad(x[..., :-d], (d, 0))


def build_gwc_volume(left: torch.Tensor, right: torch.Tensor, max_disp: int, num_groups: int) -> torch.Tensor:
    """Cosine correlation per channel group: B x G x D x H x W, zero where x < d.

    Computed in float32 even under autocast (the normalised products lose too much in fp16).
    """
    b, c, h, w = left.shape
    if c % num_groups:
        raise ValueError(f"feature width {c} is not divisible by {num_groups} correlation groups")
    cg = c // num_groups
    with torch.autocast(device_type=left.device.type, enabled=False):
        ln = F.normalize(left.float().reshape(b, num_groups, cg, h, w), dim=2)
        rn = F.normalize(right.float().reshape(b, num_groups, cg, h, w), dim=2)
        vol = [(ln * _shift_right(rn, d)).sum(dim=2) for d in range(max_disp)]
        return torch.stack(vol, dim=2)


def build_concat_volume(left: torch.Tensor, right: torch.Tensor, max_disp: int) -> torch.Tensor:
    """Left features at every disparity beside the right features shifted by d: B x 2C x D x H x W."""
    right_vol = torch.stack([_shift_right(right, d) for d in range(max_disp)], dim=2)
    left_vol = left.unsqueeze(2).expand(-1, -1, max_disp, -1, -1)
    return torch.cat([left_vol, right_vol], dim=1)


def disparity_regression(prob: torch.Tensor, max_disp: int) -> torch.Tensor:
    """Soft-argmin: expected disparity index under ``prob`` (B x D x H x W) -> B x 1 x H x W."""
    values = torch.arange(0, max_disp, dtype=prob.dtype, device=prob.device).reshape(1, max_disp, 1, 1)
    return torch.sum(prob * values, 1, keepdim=True)


class Hourglass(nn.Module):
    """3-level 3D hourglass with APC convs, feature attention and a disparity transformer branch.

    ``widths`` are the channels at full volume resolution and the three downsampled levels (the
    official teacher: c, 2c, 4c, 6c with c = 28).
    """

    def __init__(
        self,
        widths: tuple[int, int, int, int],
        feat_dims: list[int],
        max_disp: int,
        kernel_disp: int = 17,
        att_layers: int = 4,
        att_heads: int = 4,
        att_ff: int | None = None,
        heads_as_sequence: bool = False,
        agg_blocks: int = 2,
        out_blocks: int = 2,
    ) -> None:
        super().__init__()
        c0, c1, c2, c3 = widths
        kd = kernel_disp

        def down(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                BasicConv(cin, cout, is_3d=True, kernel_size=3, padding=1, stride=2),
                Conv3dNormActReduced(cout, cout, kernel_size=3, kernel_disp=kd),
            )

        def up(cin: int, cout: int) -> BasicConv:
            return BasicConv(cin, cout, deconv=True, is_3d=True, kernel_size=4, padding=1, stride=2)

        def agg(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                BasicConv(cin, cout, is_3d=True, kernel_size=1, padding=0, stride=1),
                *[Conv3dNormActReduced(cout, cout, kernel_size=3, kernel_disp=kd) for _ in range(agg_blocks)],
            )

        self.conv1 = down(c0, c1)
        self.conv2 = down(c1, c2)
        self.conv3 = down(c2, c3)
        self.conv3_up = up(c3, c2)
        self.conv2_up = up(c2, c1)
        self.conv1_up = up(c1, c0)
        self.conv_out = nn.Sequential(
            *[Conv3dNormActReduced(c0, c0, kernel_size=3, kernel_disp=kd) for _ in range(out_blocks)]
        )
        self.agg_0 = agg(c2 * 2, c2)
        self.agg_1 = agg(c1 * 2, c1)
        if att_layers > 0:
            self.atts = nn.ModuleDict(
                {
                    "4": CostVolumeDisparityAttention(
                        d_model=c0,
                        nhead=att_heads,
                        dim_feedforward=c0 if att_ff is None else att_ff,
                        num_transformer=att_layers,
                        max_len=max_disp // 16,
                        heads_as_sequence=heads_as_sequence,
                    )
                }
            )
            self.conv_patch = nn.Sequential(
                nn.Conv3d(c0, c0, kernel_size=4, stride=4, padding=0, groups=c0), nn.BatchNorm3d(c0)
            )
        else:
            self.atts = None
            self.conv_patch = None
        self.feature_att_8 = FeatureAtt(c1, feat_dims[1])
        self.feature_att_16 = FeatureAtt(c2, feat_dims[2])
        self.feature_att_32 = FeatureAtt(c3, feat_dims[3])
        self.feature_att_up_16 = FeatureAtt(c2, feat_dims[2])
        self.feature_att_up_8 = FeatureAtt(c1, feat_dims[1])

    def forward(self, x: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        conv1 = self.feature_att_8(self.conv1(x), features[1])
        conv2 = self.feature_att_16(self.conv2(conv1), features[2])
        conv3 = self.feature_att_32(self.conv3(conv2), features[3])
        conv2 = self.agg_0(torch.cat((self.conv3_up(conv3), conv2), dim=1))
        conv2 = self.feature_att_up_16(conv2, features[2])
        conv1 = self.agg_1(torch.cat((self.conv2_up(conv2), conv1), dim=1))
        conv1 = self.feature_att_up_8(conv1, features[1])
        conv = self.conv1_up(conv1)
        if self.atts is not None:
            att = self.atts["4"](self.conv_patch(x))
            conv = conv + F.interpolate(att, scale_factor=4, mode="trilinear", align_corners=False)
        return self.conv_out(conv)
