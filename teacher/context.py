"""Context network: a ResNet-style encoder giving the GRU's initial hidden state and context per level."""

from __future__ import annotations

import torch
from torch import nn

from .layers import BasicConv, ResidualBlock


class ContextNet(nn.Module):
    """Encoder at 1/4 (optionally fused with the ViT feature), then 1/8 and 1/16 levels.

    For every level it outputs ``(net, inp)`` before activations: ``net`` (hidden width) initialises the
    GRU, ``inp`` (context width) is its constant input. ``widths`` are the stem and layer1..layer5 widths
    (official: 64, 64, 96, 128, 128, 128).
    """

    def __init__(
        self,
        hidden_dims: list[int],
        context_dims: list[int],
        n_levels: int = 3,
        vit_dim: int = 0,
        widths: tuple[int, ...] = (64, 64, 96, 128, 128, 128),
        norm_fn: str = "batch",
        with_unused: bool = False,
    ) -> None:
        super().__init__()
        stem, w1, w2, w3, w4, w5 = widths
        self.n_levels = n_levels
        self.norm1 = nn.BatchNorm2d(stem) if norm_fn == "batch" else nn.InstanceNorm2d(stem)
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=1, padding=3)
        self.relu1 = nn.ReLU()
        self.layer1 = self._make_layer(stem, w1, 1, norm_fn)
        self.layer2 = self._make_layer(w1, w2, 2, norm_fn)
        self.layer3 = self._make_layer(w2, w3, 2, norm_fn)
        self.layer4 = self._make_layer(w3, w4, 2, norm_fn) if n_levels >= 2 else None
        self.layer5 = self._make_layer(w4, w5, 2, norm_fn) if n_levels >= 3 else None
        if with_unused:
            # Present in the official checkpoint, never called by its forward pass.
            self.down = nn.Sequential(nn.Conv2d(w3, w3, kernel_size=4, stride=4), nn.BatchNorm2d(w3))
        self.conv2 = BasicConv(w3 + vit_dim, w3, kernel_size=3, padding=1) if vit_dim > 0 else None
        if with_unused:
            self.norm = nn.BatchNorm2d(2 * w3)
        # Official indexing: hidden_dims lists the coarsest level first.
        dims = [hidden_dims, context_dims]
        self.outputs04 = nn.ModuleList(
            nn.Sequential(ResidualBlock(w3, w3, norm_fn), nn.Conv2d(w3, d[-1], 3, padding=1)) for d in dims
        )
        self.outputs08 = (
            nn.ModuleList(
                nn.Sequential(ResidualBlock(w4, w4, norm_fn), nn.Conv2d(w4, d[-2], 3, padding=1)) for d in dims
            )
            if n_levels >= 2
            else None
        )
        self.outputs16 = (
            nn.ModuleList(nn.Conv2d(w5, d[-3], 3, padding=1) for d in dims) if n_levels >= 3 else None
        )

    @staticmethod
    def _make_layer(cin: int, cout: int, stride: int, norm_fn: str) -> nn.Sequential:
        return nn.Sequential(ResidualBlock(cin, cout, norm_fn, stride=stride), ResidualBlock(cout, cout, norm_fn))

    def forward(
        self, x: torch.Tensor, vit_feat: torch.Tensor | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(net, inp)] per level, finest (1/4) first, before tanh / relu."""
        x = self.relu1(self.norm1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        if self.conv2 is not None:
            x = self.conv2(torch.cat([x, vit_feat.to(x.dtype)], dim=1))
        out = [tuple(f(x) for f in self.outputs04)]
        if self.layer4 is not None:
            y = self.layer4(x)
            out.append(tuple(f(y) for f in self.outputs08))
            if self.layer5 is not None:
                z = self.layer5(y)
                out.append(tuple(f(z) for f in self.outputs16))
        return out
