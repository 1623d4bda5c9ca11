"""Convolution, normalisation and attention blocks of the FoundationStereo family.

Every block takes its widths as arguments, so teacher and students share them and pruning can change
them. Submodules are registered in the official order so that ``state_dict()`` keys come out in the
official checkpoint's order.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn


def fp32_region(device: torch.device):
    """Disable autocast for a block that must run in float32 (correlation normalisation)."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()  # e.g. the meta device used for counting has no autocast


class Float32Island(nn.Module):
    """Base of the parameterless modules that must compute in float32 under mixed precision.

    Their forward runs inside :func:`fp32_region`. Being modules (not bare functions) gives their exported
    ONNX nodes a name scope, so deployment keeps the same nodes float32 in an fp16 graph
    (``compress.export`` finds these modules and records their scopes at export).
    """


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an N x C x H x W tensor."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2).contiguous()


def _norm(kind: str, channels: int, is_3d: bool) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels) if is_3d else nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels) if is_3d else nn.InstanceNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}")


class BasicConv(nn.Module):
    """Conv (2D/3D, optionally transposed) without bias, then a norm and LeakyReLU(0.01)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        deconv: bool = False,
        is_3d: bool = False,
        bn: bool = True,
        relu: bool = True,
        norm: str = "batch",
        **kwargs,
    ) -> None:
        super().__init__()
        self.relu = relu
        # The official block registers its norm before the conv; keep that order for state_dict keys.
        self.bn = _norm(norm, out_channels, is_3d) if bn else nn.Identity()
        if is_3d:
            conv_cls = nn.ConvTranspose3d if deconv else nn.Conv3d
        else:
            conv_cls = nn.ConvTranspose2d if deconv else nn.Conv2d
        self.conv = conv_cls(in_channels, out_channels, bias=False, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.leaky_relu(x, 0.01) if self.relu else x


class BasicConvIN(nn.Module):
    """Conv without bias, InstanceNorm (no affine) and LeakyReLU(0.01)."""

    def __init__(
        self, in_channels: int, out_channels: int, deconv: bool = False, is_3d: bool = False, **kwargs
    ) -> None:
        super().__init__()
        if is_3d:
            conv_cls = nn.ConvTranspose3d if deconv else nn.Conv3d
        else:
            conv_cls = nn.ConvTranspose2d if deconv else nn.Conv2d
        self.conv = conv_cls(in_channels, out_channels, bias=False, **kwargs)
        self.IN = nn.InstanceNorm3d(out_channels) if is_3d else nn.InstanceNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.IN(self.conv(x)), 0.01)


class Conv3dNormActReduced(nn.Module):
    """Axial-plus-disparity (APC) 3D conv: a k x k spatial conv, then a kernel_disp conv along disparity."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, kernel_disp: int = 17,
                 hidden: int | None = None) -> None:
        super().__init__()
        k, kd = kernel_size, kernel_disp
        mid = c_out if hidden is None else hidden
        self.conv1 = nn.Sequential(
            nn.Conv3d(c_in, mid, kernel_size=(1, k, k), padding=(0, k // 2, k // 2)),
            nn.BatchNorm3d(mid),
            nn.ReLU(),
        )
        self.conv2 = nn.Sequential(
            nn.Conv3d(mid, c_out, kernel_size=(kd, 1, 1), padding=(kd // 2, 0, 0)),
            nn.BatchNorm3d(c_out),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class ResnetBasicBlock(nn.Module):
    """Two k x k convs with norms and a residual connection (2D or 3D), as in torchvision's BasicBlock."""

    def __init__(
        self,
        inplanes: int,
        planes: int,
        kernel_size: int = 3,
        padding: int = 1,
        norm: str = "batch",
        is_3d: bool = False,
        bias: bool = False,
    ) -> None:
        super().__init__()
        conv_cls = nn.Conv3d if is_3d else nn.Conv2d
        self.conv1 = conv_cls(inplanes, planes, kernel_size=kernel_size, padding=padding, bias=bias)
        self.bn1 = _norm(norm, planes, is_3d)
        self.relu = nn.ReLU()
        self.conv2 = conv_cls(planes, planes, kernel_size=kernel_size, padding=padding, bias=bias)
        self.bn2 = _norm(norm, planes, is_3d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class ResidualBlock(nn.Module):
    """RAFT-style residual block with a 1x1 projection shortcut when the shape changes.

    The official block registers its third norm twice (as ``norm3`` and inside ``downsample``); the
    same module under both names keeps both checkpoint keys, and loading writes both from one tensor.
    """

    def __init__(self, in_planes: int, planes: int, norm_fn: str = "batch", stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, padding=1, stride=stride)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1)
        self.relu = nn.ReLU()
        self.norm1 = _norm(norm_fn, planes, False)
        self.norm2 = _norm(norm_fn, planes, False)
        if stride == 1 and in_planes == planes:
            self.downsample = None
        else:
            self.norm3 = _norm(norm_fn, planes, False)
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride), self.norm3
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.norm1(self.conv1(x)))
        y = self.relu(self.norm2(self.conv2(y)))
        if self.downsample is not None:
            x = self.downsample(x)
        return self.relu(x + y)


class Conv2xIN(nn.Module):
    """Decoder step: transposed conv x2 (InstanceNorm), concat with the skip, residual block."""

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int | None = None) -> None:
        super().__init__()
        skip = out_channels if skip_channels is None else skip_channels
        self.conv1 = BasicConvIN(in_channels, out_channels, deconv=True, kernel_size=4, stride=2, padding=1)
        self.conv2 = ResnetBasicBlock(out_channels + skip, out_channels + skip, norm="instance")

    def forward(self, x: torch.Tensor, rem: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if x.shape[-2:] != rem.shape[-2:]:
            x = F.interpolate(x, size=rem.shape[-2:], mode="bilinear")
        return self.conv2(torch.cat((x, rem), 1))


class Conv2x(nn.Module):
    """Upsampling step of the convex-upsampling path: transposed conv x2, concat skip, 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int | None = None) -> None:
        super().__init__()
        skip = out_channels if skip_channels is None else skip_channels
        self.conv1 = BasicConv(in_channels, out_channels, deconv=True, bn=False, kernel_size=4, stride=2, padding=1)
        self.conv2 = BasicConv(out_channels + skip, out_channels + skip, bn=False, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, rem: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if x.shape[-2:] != rem.shape[-2:]:
            x = F.interpolate(x, size=rem.shape[-2:], mode="bilinear")
        return self.conv2(torch.cat((x, rem), 1))


class FeatureAtt(nn.Module):
    """Gates a cost volume per channel and pixel with a sigmoid computed from image features."""

    def __init__(self, cv_chan: int, feat_chan: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = feat_chan // 2 if hidden is None else hidden
        self.feat_att = nn.Sequential(
            BasicConv(feat_chan, hidden, kernel_size=1, stride=1, padding=0),
            nn.Conv2d(hidden, cv_chan, 1),
        )

    def forward(self, cv: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.feat_att(feat).unsqueeze(2)) * cv


class ChannelAttentionEnhancement(nn.Module):
    """CBAM-style channel attention (shared MLP on average- and max-pooled features)."""

    def __init__(self, in_planes: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = in_planes // 16 if hidden is None else hidden
        self.fc = nn.Sequential(
            nn.Conv2d(in_planes, hidden, 1, bias=False), nn.ReLU(), nn.Conv2d(hidden, in_planes, 1, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.fc(x.mean(dim=(2, 3), keepdim=True))
        mx = self.fc(x.amax(dim=(2, 3), keepdim=True))
        return torch.sigmoid(avg + mx)


class SpatialAttentionExtractor(nn.Module):
    """CBAM-style spatial attention from the channel mean and max; gates the small vs large GRU."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.samconv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.samconv(x))


class EdgeNextConvEncoder(nn.Module):
    """ConvNeXt-style block (depthwise k x k conv, pointwise MLP, layer scale) of the disparity head."""

    def __init__(self, dim: int, expan_ratio: int = 4, kernel_size: int = 7, hidden: int | None = None) -> None:
        super().__init__()
        hidden = expan_ratio * dim if hidden is None else hidden
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=kernel_size, padding=kernel_size // 2, groups=dim)
        self.pwconv1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(y)))
        return x + y.permute(0, 3, 1, 2)


def sinusoidal_table(length: int, d_model: int) -> torch.Tensor:
    """The fixed 1 x length x d_model sine/cosine positional table of the disparity transformer."""
    if d_model % 2:
        raise ValueError(f"disparity transformer width must be even, got {d_model}")
    position = torch.arange(0, length).float().unsqueeze(1)
    div_term = (torch.arange(0, d_model, 2).float() * -(math.log(10000.0) / d_model)).exp()[None]
    pe = torch.zeros(length, d_model)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe.unsqueeze(0)


class DisparityMultiheadAttention(nn.Module):
    """Multi-head self-attention with separate Q/K/V projections.

    ``heads_as_sequence=True`` reproduces the released FoundationStereo weights' behaviour: heads are
    not moved in front of the sequence axis before scaled-dot-product attention, so attention mixes the
    heads at each position instead of the positions. Students use the standard form (False).
    """

    def __init__(self, embed_dim: int, num_heads: int, heads_as_sequence: bool = False) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.heads_as_sequence = heads_as_sequence
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        # Head width from the weights, so pruning whole heads keeps the module consistent.
        head_dim = self.q_proj.out_features // self.num_heads
        q, k, v = (p(x).view(n, length, self.num_heads, head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        if not self.heads_as_sequence:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        if not self.heads_as_sequence:
            out = out.transpose(1, 2)
        return self.out_proj(out.reshape(n, length, -1))


class DisparityTransformerLayer(nn.Module):
    """Post-norm transformer encoder layer (GELU MLP) over the disparity axis."""

    def __init__(self, embed_dim: int, num_heads: int, dim_feedforward: int, heads_as_sequence: bool = False):
        super().__init__()
        self.self_attn = DisparityMultiheadAttention(embed_dim, num_heads, heads_as_sequence)
        self.act = nn.GELU()
        self.linear1 = nn.Linear(embed_dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, embed_dim)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.norm2 = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x))
        return self.norm2(x + self.linear2(self.act(self.linear1(x))))


class CostVolumeDisparityAttention(nn.Module):
    """Transformer layers applied along the disparity axis of a B x C x D x H x W volume."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        num_transformer: int,
        max_len: int,
        heads_as_sequence: bool = False,
    ) -> None:
        super().__init__()
        self.sa = nn.ModuleList(
            DisparityTransformerLayer(d_model, nhead, dim_feedforward, heads_as_sequence)
            for _ in range(num_transformer)
        )
        # Fixed table, not in the checkpoint; a buffer keeps it on the model's device (capture-safe).
        self.register_buffer("pos_table", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, cv: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = cv.shape
        x = cv.permute(0, 3, 4, 2, 1).reshape(b * h * w, d, c)
        x = x + self.pos_table[:, :d].to(x.dtype)
        for layer in self.sa:
            x = layer(x)
        return x.reshape(b, h, w, d, c).permute(0, 4, 3, 1, 2)
