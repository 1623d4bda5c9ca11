"""Typed intermediates shared by teacher and students, so distillation treats them alike."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StereoOutput:
    """Everything a forward pass computed that distillation, pruning and evaluation read.

    Shapes use B = batch, D = disparity levels at volume resolution, (h, w) = volume resolution.
    """

    disp: torch.Tensor
    """Final full-resolution disparity, B x 1 x H x W (pixels)."""
    init_disp: torch.Tensor
    """Soft-argmin disparity from the filtered cost volume, B x 1 x h x w (volume-resolution pixels)."""
    disp_preds: list[torch.Tensor] = field(default_factory=list)
    """Full-resolution prediction after each refinement iteration (all iterations, also in test mode)."""
    features_left: list[torch.Tensor] = field(default_factory=list)
    """Left feature pyramid, finest first (1/4, 1/8, 1/16, 1/32 for the teacher)."""
    features_right: list[torch.Tensor] = field(default_factory=list)
    """Right feature pyramid, same layout as features_left."""
    vit_feat: torch.Tensor | None = None
    """Left-image ViT (DepthAnything DPT) feature at 1/4 resolution; None for students without a ViT."""
    cost_volume: torch.Tensor | None = None
    """Combined (group-wise correlation + concatenation) volume before filtering, B x C x D x h x w."""
    filtered_volume: torch.Tensor | None = None
    """Cost volume after the stem, feature attention and hourglass, B x C' x D x h x w."""
    cost_logits: torch.Tensor | None = None
    """Classifier logits over disparity, B x D x h x w (softmax gives the disparity distribution)."""
    hidden_states: list[list[torch.Tensor]] = field(default_factory=list)
    """GRU hidden states after each iteration, one list per iteration, finest level first."""
    disp_lowres: list[torch.Tensor] = field(default_factory=list)
    """Volume-resolution disparity after each iteration, B x 1 x h x w."""
    volume_scale: int = 4
    """Image-to-volume resolution ratio (4 or 8)."""
