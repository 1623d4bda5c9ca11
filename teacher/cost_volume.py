"""Hybrid cost volume (group-wise correlation + concatenation) and its filtering (APC hourglass)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (
    BasicConv,
    Conv3dNormActReduced,
    CostVolumeDisparityAttention,
    FeatureAtt,
    Float32Island,
    fp32_region,
)


def _shift_right(x: torch.Tensor, d: int) -> torch.Tensor:
    """x shifted right by d pixels along width, zero-filled on the left (x[..., w] -> x[..., w + d])."""
    if d == 0:
        return x
    # Pad, then crop to the width: no branch on the width, so a traced graph is right at any width.
    return F.pad(x, (d, 0))[..., : x.shape[-1]]


def build_gwc_volume(
    left: torch.Tensor, right: torch.Tensor, max_disp: int, num_groups: int, normalize: bool = True
) -> torch.Tensor:
    """Cosine correlation per channel group: B x G x D x H x W, zero where x < d.

    Computed in float32 even under autocast (the normalised products lose too much in fp16).
    ``normalize=False`` sums the raw products per group (some released Fast-FoundationStereo students).
    """
    b, c, h, w = left.shape
    if c % num_groups:
        raise ValueError(f"feature width {c} is not divisible by {num_groups} correlation groups")
    cg = c // num_groups
    with fp32_region(left.device):
        ln = left.float().reshape(b, num_groups, cg, h, w)
        rn = right.float().reshape(b, num_groups, cg, h, w)
        if normalize:
            ln, rn = F.normalize(ln, dim=2), F.normalize(rn, dim=2)
        vol = [(ln * _shift_right(rn, d)).sum(dim=2) for d in range(max_disp)]
        return torch.stack(vol, dim=2)


class GwcVolume(Float32Island):
    """:func:`build_gwc_volume` as a module, so its exported nodes carry a name scope (kept float32 in fp16)."""

    def __init__(self, num_groups: int) -> None:
        super().__init__()
        self.num_groups = num_groups

    def forward(self, left: torch.Tensor, right: torch.Tensor, max_disp: int) -> torch.Tensor:
        """B x G x D x H x W cosine correlation volume."""
        return build_gwc_volume(left, right, max_disp, self.num_groups)


def build_concat_volume(left: torch.Tensor, right: torch.Tensor, max_disp: int) -> torch.Tensor:
    """Left features at every disparity beside the right features shifted by d: B x 2C x D x H x W."""
    right_vol = torch.stack([_shift_right(right, d) for d in range(max_disp)], dim=2)
    left_vol = left.unsqueeze(2).expand(-1, -1, max_disp, -1, -1)
    return torch.cat([left_vol, right_vol], dim=1)


def disparity_regression(prob: torch.Tensor, max_disp: int) -> torch.Tensor:
    """Soft-argmin: expected disparity index under ``prob`` (B x D x H x W) -> B x 1 x H x W."""
    values = torch.arange(0, max_disp, dtype=prob.dtype, device=prob.device).reshape(1, max_disp, 1, 1)
    return torch.sum(prob * values, 1, keepdim=True)


class DisparityRegression(Float32Island):
    """Softmax over the classifier's logits and the soft-argmin, in float32 (fp16 would round the disparity)."""

    def forward(self, logits: torch.Tensor, levels: int) -> torch.Tensor:
        """B x 1 x h x w expected disparity index."""
        with fp32_region(logits.device):
            return disparity_regression(torch.softmax(logits.float(), dim=1), levels)


class Hourglass(nn.Module):
    """3D hourglass (1-3 levels) with APC convs, feature attention and a disparity transformer branch.

    ``widths`` are the channels at full volume resolution and at each downsampled level (the official
    teacher: c, 2c, 4c, 6c with c = 28). ``features[k]`` is the image feature at level k's resolution;
    ``base_scale`` (4 or 8) names the feature-attention modules by resolution, as the official
    checkpoint does (``feature_att_8`` is the first level below a 1/4 volume).
    """

    def __init__(
        self,
        widths: tuple[int, ...],
        feat_dims: list[int],
        max_disp: int,
        kernel_disp: int = 17,
        att_layers: int = 4,
        att_heads: int = 4,
        att_ff: int | None = None,
        heads_as_sequence: bool = False,
        agg_blocks: int = 2,
        out_blocks: int = 2,
        base_scale: int = 4,
    ) -> None:
        super().__init__()
        levels = len(widths) - 1
        if not 1 <= levels <= 3:
            raise ValueError(f"hourglass needs 1 to 3 levels, got {levels}")
        self.levels = levels
        self.base_scale = base_scale
        kd = kernel_disp
        w = widths

        def apc(c: int) -> Conv3dNormActReduced:
            return Conv3dNormActReduced(c, c, kernel_size=3, kernel_disp=kd)

        for k in range(1, levels + 1):  # down path: conv1..convL
            setattr(
                self,
                f"conv{k}",
                nn.Sequential(BasicConv(w[k - 1], w[k], is_3d=True, kernel_size=3, padding=1, stride=2), apc(w[k])),
            )
        for k in range(levels, 0, -1):  # up path: convL_up..conv1_up
            setattr(
                self,
                f"conv{k}_up",
                BasicConv(w[k], w[k - 1], deconv=True, is_3d=True, kernel_size=4, padding=1, stride=2),
            )
        self.conv_out = nn.Sequential(*[apc(w[0]) for _ in range(out_blocks)])
        # agg_0 merges at level L-1, agg_1 at level L-2, ... (official names for L = 3).
        for i, k in enumerate(range(levels - 1, 0, -1)):
            setattr(
                self,
                f"agg_{i}",
                nn.Sequential(
                    BasicConv(w[k] * 2, w[k], is_3d=True, kernel_size=1, padding=0, stride=1),
                    *[apc(w[k]) for _ in range(agg_blocks)],
                ),
            )
        if att_layers > 0:
            self.atts = nn.ModuleDict(
                {
                    "4": CostVolumeDisparityAttention(
                        d_model=w[0],
                        nhead=att_heads,
                        dim_feedforward=w[0] if att_ff is None else att_ff,
                        num_transformer=att_layers,
                        max_len=max_disp // (base_scale * 4),
                        heads_as_sequence=heads_as_sequence,
                    )
                }
            )
            self.conv_patch = nn.Sequential(
                nn.Conv3d(w[0], w[0], kernel_size=4, stride=4, padding=0, groups=w[0]), nn.BatchNorm3d(w[0])
            )
        else:
            self.atts = None
            self.conv_patch = None
        for k in range(1, levels + 1):
            setattr(self, f"feature_att_{base_scale * 2**k}", FeatureAtt(w[k], feat_dims[k]))
        for k in range(levels - 1, 0, -1):
            setattr(self, f"feature_att_up_{base_scale * 2**k}", FeatureAtt(w[k], feat_dims[k]))

    def forward(self, x: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        s, n = self.base_scale, self.levels
        downs = [x]
        for k in range(1, n + 1):
            y = getattr(self, f"conv{k}")(downs[-1])
            downs.append(getattr(self, f"feature_att_{s * 2**k}")(y, features[k]))
        y = downs[n]
        for i, k in enumerate(range(n - 1, 0, -1)):
            # A searched student may replace an up step by one merge block (upsample, merge, refine).
            merge = getattr(self, f"post{s * 2 ** (k + 1)}_to_{s * 2**k}", None)
            if merge is not None:
                y = merge(downs[k], y, features[k])
                continue
            y = torch.cat((getattr(self, f"conv{k + 1}_up")(y), downs[k]), dim=1)
            y = getattr(self, f"agg_{i}")(y)
            y = getattr(self, f"feature_att_up_{s * 2**k}")(y, features[k])
        conv = self.conv1_up(y)
        merge = getattr(self, f"post{2 * s}_to_{s}", None)
        if merge is not None:
            return merge(x, conv)
        if self.atts is not None:
            att = self.atts["4"](self.conv_patch(x))
            conv = conv + F.interpolate(att, scale_factor=4, mode="trilinear", align_corners=False)
        return self.conv_out(conv)
