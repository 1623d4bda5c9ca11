"""DINOv2 ViT and the DepthAnythingV2 DPT head, built locally (no hub, no download).

Module names follow the official ``depth_anything.pretrained`` / ``depth_anything.depth_head`` layout
so that FoundationStereo checkpoints load strictly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import fp32_region


@dataclass(frozen=True)
class VitSpec:
    """Shape of one DINOv2 / DepthAnythingV2 size."""

    embed_dim: int
    depth: int
    num_heads: int
    dpt_features: int
    dpt_out_channels: tuple[int, int, int, int]
    intermediate_layers: tuple[int, int, int, int]


VIT_SPECS: dict[str, VitSpec] = {
    "vits": VitSpec(384, 12, 6, 64, (48, 96, 192, 384), (2, 5, 8, 11)),
    "vitb": VitSpec(768, 12, 12, 128, (96, 192, 384, 768), (2, 5, 8, 11)),
    "vitl": VitSpec(1024, 24, 16, 256, (256, 512, 1024, 1024), (4, 11, 17, 23)),
    # Not an official size: a tiny ViT so that the full teacher code path runs fast in tests.
    "vitt": VitSpec(48, 4, 3, 32, (16, 16, 32, 32), (0, 1, 2, 3)),
}

PATCH_SIZE = 14
PRETRAIN_GRID = 37  # 518 / 14: the positional table covers a 37 x 37 patch grid


class PatchEmbed(nn.Module):
    """Non-overlapping 14 x 14 patches projected to tokens."""

    def __init__(self, embed_dim: int, patch_size: int = PATCH_SIZE) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Standard multi-head self-attention with a fused QKV projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = (t.transpose(1, 2) for t in torch.unbind(qkv, 2))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """Two-layer GELU MLP."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _cubic_near(x: float, a: float) -> float:
    """Cubic convolution kernel for |x| <= 1."""
    return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic_far(x: float, a: float) -> float:
    """Cubic convolution kernel for 1 < |x| < 2."""
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def bicubic_matrix(out_size: int, in_size: int, scale: float, a: float = -0.75) -> torch.Tensor:
    """out_size x in_size float32 matrix of PyTorch's bicubic resize along one axis.

    Same sampling as ``F.interpolate(mode="bicubic", align_corners=False, scale_factor=scale)``: source
    position ``(i + 0.5) / scale - 0.5``, four taps with coefficient ``a``, indices clamped to the border.
    Built from Python numbers, so a traced graph holds it as one constant.
    """
    rows = []
    for i in range(out_size):
        real = (i + 0.5) / scale - 0.5
        base = min(math.floor(real), in_size - 1)
        t = min(max(real - base, 0.0), 1.0)
        taps = (_cubic_far(t + 1, a), _cubic_near(t, a), _cubic_near(1 - t, a), _cubic_far(2 - t, a))
        row = [0.0] * in_size
        for k, weight in enumerate(taps):
            row[min(max(base - 1 + k, 0), in_size - 1)] += weight
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


class LayerScale(nn.Module):
    """Per-channel learned residual scale."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm ViT block with layer scale."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT/14 with a 37 x 37 positional table interpolated to the input's patch grid."""

    def __init__(self, spec: VitSpec) -> None:
        super().__init__()
        dim = spec.embed_dim
        self.patch_size = PATCH_SIZE
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, PRETRAIN_GRID * PRETRAIN_GRID + 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # unused at inference, kept for the checkpoint
        self.patch_embed = PatchEmbed(dim)
        self.blocks = nn.ModuleList(Block(dim, spec.num_heads) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def interpolate_pos_encoding(self, rows: int, cols: int) -> torch.Tensor:
        """Positional table for a rows x cols patch grid (bicubic, DINOv2's scale-factor convention)."""
        n = self.pos_embed.shape[1] - 1
        if rows * cols == n and rows == cols:
            return self.pos_embed
        pos = self.pos_embed.float()
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        m = PRETRAIN_GRID
        dim = pos.shape[-1]
        scales = ((rows + 0.1) / m, (cols + 0.1) / m)
        if torch.jit.is_tracing():
            # The ONNX tracer cannot export a scale-factor bicubic resize; bicubic is separable, so the
            # traced graph gets two matrix products instead (equal to float32 rounding, ~1e-5 relative).
            # Eager runs keep F.interpolate, bit-identical to the official model.
            with fp32_region(pos.device):
                grid = torch.matmul(bicubic_matrix(rows, m, scales[0]).to(pos.device), patch_pos[0].reshape(m, -1))
                grid = torch.matmul(bicubic_matrix(cols, m, scales[1]).to(pos.device), grid.reshape(rows, m, dim))
            patch_pos = grid.reshape(1, rows * cols, dim)
        else:
            # DINOv2 passes scale factors with a 0.1 offset, not a target size; the released weights were
            # used this way, so the sampling positions must match it.
            patch_pos = F.interpolate(
                patch_pos.reshape(1, m, m, dim).permute(0, 3, 1, 2),
                scale_factor=scales,
                mode="bicubic",
                antialias=False,
            )
            patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((cls_pos, patch_pos), dim=1).to(self.pos_embed.dtype)

    def get_intermediate_layers(self, x: torch.Tensor, layers: tuple[int, ...]) -> list[torch.Tensor]:
        """Final-LayerNorm-ed tokens (cls first) after each block index in ``layers``."""
        rows, cols = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(rows, cols).to(tokens.dtype)
        out = []
        for i, blk in enumerate(self.blocks):
            tokens = blk(tokens)
            if i in layers:
                out.append(self.norm(tokens))
        return out


class ResidualConvUnit(nn.Module):
    """ReLU-conv-ReLU-conv with a residual connection (DPT)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(F.relu(x))))
        return out + x


class FeatureFusionBlock(nn.Module):
    """DPT fusion: add the refined skip, refine, upsample (bilinear, align_corners), 1x1 conv."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, size=None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTHead(nn.Module):
    """DepthAnythingV2's DPT decoder up to ``output_conv1`` (the feature FoundationStereo uses)."""

    def __init__(self, in_channels: int, features: int, out_channels: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.projects = nn.ModuleList(nn.Conv2d(in_channels, c, kernel_size=1) for c in out_channels)
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(out_channels[0], out_channels[0], kernel_size=4, stride=4),
                nn.ConvTranspose2d(out_channels[1], out_channels[1], kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(out_channels[3], out_channels[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        scratch = nn.Module()
        for i, c in enumerate(out_channels, start=1):
            setattr(scratch, f"layer{i}_rn", nn.Conv2d(c, features, kernel_size=3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(scratch, f"refinenet{i}", FeatureFusionBlock(features))
        scratch.output_conv1 = nn.Conv2d(features, features // 2, kernel_size=3, padding=1)
        # output_conv2 produces DepthAnything's relative depth, which FoundationStereo never reads.
        scratch.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 1, kernel_size=1),
            nn.ReLU(),
            nn.Identity(),
        )
        self.scratch = scratch

    def forward(self, tokens: list[torch.Tensor], rows: int, cols: int) -> torch.Tensor:
        layers = []
        for i, t in enumerate(tokens):
            x = t[:, 1:].permute(0, 2, 1).reshape(t.shape[0], t.shape[-1], rows, cols)
            layers.append(self.resize_layers[i](self.projects[i](x)))
        s = self.scratch
        l1, l2, l3, l4 = s.layer1_rn(layers[0]), s.layer2_rn(layers[1]), s.layer3_rn(layers[2]), s.layer4_rn(layers[3])
        path4 = s.refinenet4(l4, size=l3.shape[2:])
        path3 = s.refinenet3(path4, l3, size=l2.shape[2:])
        path2 = s.refinenet2(path3, l2, size=l1.shape[2:])
        path1 = s.refinenet1(path2, l1)
        out = s.output_conv1(path1)
        return F.interpolate(out, (rows * PATCH_SIZE, cols * PATCH_SIZE), mode="bilinear", align_corners=True)


class DepthAnything(nn.Module):
    """DINOv2 encoder (``pretrained``) + DPT head, named as in the official checkpoint."""

    def __init__(self, spec: VitSpec) -> None:
        super().__init__()
        self.pretrained = DinoVisionTransformer(spec)
        self.depth_head = DPTHead(spec.embed_dim, spec.dpt_features, spec.dpt_out_channels)


class DepthAnythingFeature(nn.Module):
    """Frozen DepthAnythingV2 feature: DPT ``output_conv1`` at the resized input's resolution."""

    def __init__(self, vit_size: str) -> None:
        super().__init__()
        self.spec = VIT_SPECS[vit_size]
        self.depth_anything = DepthAnything(self.spec)

    @property
    def out_channels(self) -> int:
        """Width of the feature passed on to the stereo network."""
        return self.spec.dpt_features // 2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns the DPT feature and the four normed intermediate token sets."""
        rows, cols = x.shape[-2] // PATCH_SIZE, x.shape[-1] // PATCH_SIZE
        tokens = self.depth_anything.pretrained.get_intermediate_layers(x, self.spec.intermediate_layers)
        return self.depth_anything.depth_head(tokens, rows, cols), tokens
