"""Feature extractors: timm EdgeNeXt with a U-Net decoder, side-tuned with a frozen DepthAnything ViT."""

from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from timm.models.edgenext import EdgeNeXt, PositionalEncodingFourier
from torch import nn

from .dinov2 import PATCH_SIZE, DepthAnythingFeature
from .layers import BasicConv, Conv2xIN, ResidualBlock

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIT_MAX_SIDE = 1344


def normalize_image(img: torch.Tensor) -> torch.Tensor:
    """RGB 0..255 -> ImageNet-normalised float."""

    def per_channel(values: tuple[float, float, float]) -> torch.Tensor:
        # Filled on the input's device: torch.tensor(list) would copy from the host, which a CUDA graph forbids.
        return torch.cat([img.new_full((1, 1, 1, 1), v) for v in values], dim=1)

    return ((img / 255.0 - per_channel(IMAGENET_MEAN)) / per_channel(IMAGENET_STD)).contiguous()


def vit_input_size(height: int, width: int, divider: int = 112, max_side: int = VIT_MAX_SIDE) -> tuple[int, int]:
    """Each side rounded up to a multiple of ``divider`` (lcm of patch 14 and stride 16), capped by aspect."""
    h = int(math.ceil(height / divider) * divider)
    w = int(math.ceil(width / divider) * divider)
    if h > max_side or w > max_side:
        if h > w:
            w = int(math.ceil(w * max_side / h / divider) * divider)
            h = max_side
        else:
            h = int(math.ceil(h * max_side / w / divider) * divider)
            w = max_side
    return h, w


def build_edgenext(
    dims: tuple[int, ...] = (48, 96, 160, 304), depths: tuple[int, ...] = (3, 3, 9, 3), **kwargs
) -> nn.Module:
    """timm's EdgeNeXt class with chosen widths/depths, never pretrained (no download)."""
    return EdgeNeXt(dims=tuple(dims), depths=tuple(depths), num_classes=0, **kwargs)


def build_timm_backbone(name: str, **kwargs) -> nn.Module:
    """Any timm model with a ``stem`` and 4 ``stages`` (ConvNeXt, EdgeNeXt families), without weights."""
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


class DevicePositionalEncodingFourier(PositionalEncodingFourier):
    """timm's EdgeNeXt positional encoding with its all-ones mask made on the weights' device.

    timm makes the mask on the host and copies it to the device on every call, which CUDA-graph capture
    forbids; the rest is timm's computation unchanged (same values, same ``token_projection`` weights).
    """

    def forward(self, shape: tuple[int, int, int]) -> torch.Tensor:
        weight = self.token_projection.weight
        inv_mask = torch.ones(shape, dtype=torch.bool, device=weight.device)
        y_embed = inv_mask.cumsum(1, dtype=torch.float32)
        x_embed = inv_mask.cumsum(2, dtype=torch.float32)
        y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6) * self.scale
        x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6) * self.scale
        dim_t = torch.arange(self.hidden_dim, dtype=torch.int64, device=weight.device).to(torch.float32)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.hidden_dim)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
        return self.token_projection(pos.to(weight.dtype))


class StereoFeature(nn.Module):
    """EdgeNeXt stages (1/4..1/32) decoded back to 1/4 with skips, optionally fused with a ViT feature.

    Pyramid widths (``d_out``): [2*c0 + vit, 2*c1, 2*c2, c3] at 1/4, 1/8, 1/16, 1/32.
    """

    def __init__(
        self,
        backbone: nn.Module,
        chans: tuple[int, int, int, int],
        vit_size: str | None = None,
        out4: int | None = None,
        refine_blocks: int = 2,
        head: str = "refine",
    ) -> None:
        super().__init__()
        for module in backbone.modules():
            if type(module) is PositionalEncodingFourier:
                module.__class__ = DevicePositionalEncodingFourier  # same state, capture-safe forward
        self.stem = backbone.stem
        self.stages = backbone.stages
        self.chans = tuple(chans)
        if vit_size is not None:
            self.dino = DepthAnythingFeature(vit_size)
            for p in self.dino.parameters():
                p.requires_grad_(False)
            vit_dim = self.dino.out_channels
        else:
            self.dino = None
            vit_dim = 0
        c0, c1, c2, c3 = chans
        self.deconv32_16 = Conv2xIN(c3, c2)
        self.deconv16_8 = Conv2xIN(c2 * 2, c1)
        self.deconv8_4 = Conv2xIN(c1 * 2, c0)
        cin = c0 * 2 + vit_dim
        cout = cin if out4 is None else out4
        if head == "refine":  # the teacher: 3x3 conv + residual blocks
            self.conv4 = nn.Sequential(
                BasicConv(cin, cout, kernel_size=3, stride=1, padding=1, norm="instance"),
                *[ResidualBlock(cout, cout, norm_fn="instance") for _ in range(refine_blocks)],
            )
        elif head == "conv1x1":  # Fast-FoundationStereo's students: one projection
            self.conv4 = nn.Conv2d(cin, cout, kernel_size=1)
        else:
            raise ValueError(f"unknown feature head {head!r}; expected 'refine' or 'conv1x1'")
        self.vit_dim = vit_dim
        self.d_out = [cout, c1 * 2, c2 * 2, c3]

    def train(self, mode: bool = True) -> StereoFeature:
        super().train(mode)
        if self.dino is not None:
            self.dino.eval()  # the ViT is frozen: its norms never switch to training statistics
        return self

    def vit_feature(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """DepthAnything feature resized to 1/4 of ``x`` (and the ViT tokens, for distillation)."""
        h, w = x.shape[-2:]
        hv, wv = vit_input_size(h, w)
        x_vit = F.interpolate(x, size=(hv, wv), mode="bicubic", align_corners=False)
        with torch.no_grad():
            feat, tokens = self.dino(x_vit)
        feat = F.interpolate(feat, size=(h // 4, w // 4), mode="bilinear", align_corners=True)
        return feat, tokens

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None, list[torch.Tensor]]:
        """Pyramid [1/4, 1/8, 1/16, 1/32], the 1/4 ViT feature (or None) and the ViT tokens."""
        vit_feat, tokens = self.vit_feature(x) if self.dino is not None else (None, [])
        x = self.stem(x)
        x4 = self.stages[0](x)
        x8 = self.stages[1](x4)
        x16 = self.stages[2](x8)
        x32 = self.stages[3](x16)
        x16 = self.deconv32_16(x32, x16)
        x8 = self.deconv16_8(x16, x8)
        x4 = self.deconv8_4(x8, x4)
        if vit_feat is not None:
            x4 = torch.cat([x4, vit_feat.to(x4.dtype)], dim=1)
        x4 = self.conv4(x4)
        return [x4, x8, x16, x32], vit_feat, tokens


def dino_input_patches(height: int, width: int) -> tuple[int, int]:
    """Patch grid the ViT sees for an image of this size."""
    hv, wv = vit_input_size(height, width)
    return hv // PATCH_SIZE, wv // PATCH_SIZE
