"""StudentConfig: every dimension of a Fast-FoundationStereo-style student, validated at config time."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm

from compress.errors import ConfigError
from compress.structured import check_keys, dump_yaml, read_yaml

BACKBONES = ("edgenext",)
"""Backbones built from explicit widths/depths; any other name must be a timm model with stem + 4 stages."""


WRITTEN_IF_SET: dict[str, Any] = {"classifier_kernel": 7}
"""Fields added after configs were first saved, with the value every earlier model has: written only when they
differ from it, so an earlier model's config, and the label-cache and latency keys built from it, stay the same."""


@dataclass
class StudentConfig:
    """A student stereo network: no ViT, a timm backbone, a hybrid cost volume, 1-3 GRU levels.

    Widths of layers changed by pruning are recorded in ``layer_shapes`` so the model rebuilds exactly.
    """

    name: str = "student"
    # backbone and feature pyramid
    backbone: str = "edgenext"
    backbone_dims: list[int] = field(default_factory=lambda: [48, 96, 160, 304])
    backbone_depths: list[int] = field(default_factory=lambda: [3, 3, 9, 3])
    backbone_heads: int = 8
    backbone_weights: str | None = None
    """A local timm EdgeNeXt state dict (e.g. ImageNet-trained), or ``timm:<model>`` (timm downloads its pretrained
    weights, e.g. ``timm:edgenext_small.usi_in1k``; online only), loaded into the backbone when the student is
    first built; a saved student's own weights win when it is loaded."""
    feature_dim: int = 224
    # cost volume
    volume_scale: int = 4
    max_disp: int = 192
    cv_groups: int = 8
    concat_dim: int = 24
    volume_dim: int = 28
    stem_blocks: int = 2
    # cost filtering
    hourglass_levels: int = 3
    hourglass_widths: list[int] = field(default_factory=lambda: [56, 112, 168])
    apc_kernel: int = 17
    agg_blocks: int = 2
    transformer_layers: int = 4
    transformer_heads: int = 4
    classifier_kernel: int = 7
    """The disparity classifier's last 3-D kernel; a sub-network may take the parent's centre (e.g. 3 of 7)."""
    # refinement
    gru_levels: int = 1
    hidden_dim: int = 128
    motion_dim: int = 128
    motion_corr_dim: int = 256
    motion_disp_dim: int = 64
    head_blocks: int = 2
    corr_levels: int = 2
    corr_radius: int = 4
    iters: int = 8
    mixed_precision: bool = True
    # Released Fast-FoundationStereo students: raw (unnormalised) group-wise correlation in some, the
    # heads-as-sequence attention of the official code, a 1x1 motion-encoder output conv.
    gwc_normalize: bool = True
    attention_heads_as_sequence: bool = False
    motion_conv_kernel: int = 3
    # Searched block variants of the cost-volume stages, by slot (see search_spaces/blocks.py).
    volume_blocks: dict[str, dict[str, Any]] = field(default_factory=dict)
    layer_shapes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.backbone_dims = [int(x) for x in self.backbone_dims]
        self.backbone_depths = [int(x) for x in self.backbone_depths]
        self.hourglass_widths = [int(x) for x in self.hourglass_widths]
        self.validate()

    def _fail(self, name: str, got: Any, expected: str) -> None:
        raise ConfigError(f"StudentConfig.{name}: got {got!r}, expected {expected}")

    def validate(self) -> None:
        """Raise a ConfigError naming the first invalid field."""
        if self.backbone not in BACKBONES:
            if self.backbone not in timm.list_models():
                self._fail("backbone", self.backbone, f"one of {BACKBONES} or a timm model name")
        if len(self.backbone_dims) != 4 or min(self.backbone_dims) < 1:
            self._fail("backbone_dims", self.backbone_dims, "4 positive stage widths")
        if len(self.backbone_depths) != 4 or min(self.backbone_depths) < 1:
            self._fail("backbone_depths", self.backbone_depths, "4 stage depths >= 1")
        if self.backbone == "edgenext" and any(d % self.backbone_heads for d in self.backbone_dims[1:]):
            self._fail(
                "backbone_heads", self.backbone_heads,
                f"a divisor of the EdgeNeXt widths {self.backbone_dims[1:]} (its attention blocks split them)",
            )
        if self.volume_scale not in (4, 8):
            self._fail("volume_scale", self.volume_scale, "4 or 8 (cost volume at 1/4 or 1/8 of the image)")
        if self.feature_dim < 1:
            self._fail("feature_dim", self.feature_dim, "a positive width")
        vol_feat = self.feature_dim if self.volume_scale == 4 else 2 * self.backbone_dims[1]
        if self.cv_groups < 1 or vol_feat % self.cv_groups:
            self._fail("cv_groups", self.cv_groups, f"a divisor of the volume feature width {vol_feat}")
        if self.concat_dim < 0 or self.concat_dim % 2:
            self._fail("concat_dim", self.concat_dim, "an even number >= 0 (half from each view)")
        if self.volume_dim < 2 or self.volume_dim % 2:
            self._fail("volume_dim", self.volume_dim, "an even width >= 2 (the classifier halves it)")
        max_levels = 3 if self.volume_scale == 4 else 2
        if not 1 <= self.hourglass_levels <= max_levels:
            self._fail("hourglass_levels", self.hourglass_levels, f"1..{max_levels} at a 1/{self.volume_scale} volume")
        if len(self.hourglass_widths) != self.hourglass_levels or min(self.hourglass_widths) < 1:
            self._fail("hourglass_widths", self.hourglass_widths, f"{self.hourglass_levels} positive widths")
        d = self.max_disp // self.volume_scale
        if self.max_disp % self.volume_scale or d % 2**self.hourglass_levels or d < 2**self.hourglass_levels:
            self._fail(
                "max_disp", self.max_disp,
                f"a multiple of {self.volume_scale * 2**self.hourglass_levels} (the hourglass halves "
                f"max_disp/{self.volume_scale} {self.hourglass_levels} times)",
            )
        if self.apc_kernel < 1 or self.apc_kernel % 2 == 0:
            self._fail("apc_kernel", self.apc_kernel, "an odd disparity kernel size")
        if self.transformer_layers < 0:
            self._fail("transformer_layers", self.transformer_layers, ">= 0")
        if self.transformer_layers > 0:
            if self.transformer_heads < 1 or self.volume_dim % self.transformer_heads:
                self._fail("transformer_heads", self.transformer_heads, f"a divisor of volume_dim {self.volume_dim}")
            if d % 4:
                self._fail("max_disp", self.max_disp, f"a multiple of {4 * self.volume_scale} with a transformer")
        if not 1 <= self.gru_levels <= 3:
            self._fail("gru_levels", self.gru_levels, "1, 2 or 3")
        if self.volume_scale == 8 and self.gru_levels > 2:
            self._fail("gru_levels", self.gru_levels, "<= 2 at a 1/8 volume (no feature below 1/32)")
        if self.hidden_dim < 16 or self.hidden_dim % 16:
            self._fail("hidden_dim", self.hidden_dim, "a multiple of 16 (channel attention divides it by 16)")
        if self.motion_dim < 2:
            self._fail("motion_dim", self.motion_dim, ">= 2")
        if self.corr_levels < 1:
            self._fail("corr_levels", self.corr_levels, ">= 1")
        if self.corr_radius < 1:
            self._fail("corr_radius", self.corr_radius, ">= 1")
        if self.motion_conv_kernel < 1 or self.motion_conv_kernel % 2 == 0:
            self._fail("motion_conv_kernel", self.motion_conv_kernel, "an odd kernel size")
        if self.iters < 1:
            self._fail("iters", self.iters, ">= 1 GRU iteration")
        if self.classifier_kernel < 1 or self.classifier_kernel % 2 == 0:
            self._fail("classifier_kernel", self.classifier_kernel, "an odd kernel size")

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML/JSON-ready); a field added later is left out at its default (see WRITTEN_IF_SET)."""
        data = dataclasses.asdict(self)
        for name, default in WRITTEN_IF_SET.items():
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudentConfig:
        """Build from a mapping; unknown keys are an error naming them."""
        check_keys(cls, data, "StudentConfig")
        return cls(**data)

    def to_yaml(self, path: str | Path) -> None:
        """Write YAML atomically."""
        dump_yaml(self, path)

    @classmethod
    def from_yaml(cls, path: str | Path) -> StudentConfig:
        """Read a YAML (or JSON: a subset of YAML) StudentConfig."""
        return cls.from_dict(read_yaml(path, "student config"))

    def to_json(self) -> str:
        """Compact JSON (for MLflow params and Optuna user attrs)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **changes: Any) -> StudentConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)
