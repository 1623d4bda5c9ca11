"""Searched block variants of the cost-volume stages, built from plain layer lists in a StudentConfig.

Fast-FoundationStereo's search replaced whole stages of the cost filtering with other blocks: a chain of
layers where any feature-attention layer also reads the image feature, or an up-path step that upsamples
the coarser volume, merges it with the finer one (sum or concat) and refines the result. A
``StudentConfig.volume_blocks`` entry names a slot (``corr_feature_att``, ``cost_agg.post32_to_16``, ...) and
gives its block as data, so any searched variant is rebuilt, saved and loaded like the rest of the family:

    {"kind": "identity"}                                      the stage is skipped
    {"kind": "absent"}                                        the module is not built (a merge replaces it)
    {"kind": "chain", "keys": "layers" | "index", "layers": [LAYER, ...]}
    {"kind": "merge", "op": "sum" | "concat", "upsample": [LAYER, ...], "out": [LAYER, ...]}

LAYER is a dict with a ``type``: ``conv3d`` (conv or transposed conv, optional batch norm and LeakyReLU),
``apc`` (spatial then disparity conv), ``res3d``, ``feature_att``, ``disparity_attention``, ``upsample``,
``raw_conv3d``, ``bn3d`` or ``identity``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.errors import ConfigError
from teacher.layers import (
    BasicConv,
    Conv3dNormActReduced,
    CostVolumeDisparityAttention,
    FeatureAtt,
    ResnetBasicBlock,
)

LAYER_TYPES = ("conv3d", "apc", "res3d", "feature_att", "disparity_attention", "upsample", "raw_conv3d", "bn3d",
               "identity")


def _run(layers, x: torch.Tensor, feat: torch.Tensor | None) -> torch.Tensor:
    for layer in layers:
        x = layer(x, feat) if isinstance(layer, FeatureAtt) else layer(x)
    return x


class FeatureChain(nn.Module):
    """Layers applied in turn; a feature-attention layer also gets the image feature (keys ``layers.N``)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, feat: torch.Tensor | None = None) -> torch.Tensor:
        return _run(self.layers, x, feat)


class FeatureSequential(nn.Sequential):
    """:class:`FeatureChain` with ``nn.Sequential``'s keys (``N``), for stages that were plain sequences."""

    def forward(self, x: torch.Tensor, feat: torch.Tensor | None = None) -> torch.Tensor:
        return _run(self, x, feat)


class MergeBlock(nn.Module):
    """Up-path step: upsample the coarser volume, sum or concatenate it with the finer one, then refine."""

    def __init__(self, upsample: list[nn.Module], op: str, out: list[nn.Module]) -> None:
        super().__init__()
        if op not in ("sum", "concat"):
            raise ConfigError(f"volume block merge op: got {op!r}, expected 'sum' or 'concat'")
        self.upsample = nn.Sequential(*upsample)
        self.op = op
        self.out = nn.ModuleList(out)

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor, feat: torch.Tensor | None = None) -> torch.Tensor:
        up = self.upsample(coarse)
        x = up + fine if self.op == "sum" else torch.cat((up, fine), dim=1)
        return _run(self.out, x, feat)


def _tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def build_layer(spec: dict[str, Any]) -> nn.Module:
    """One layer of a volume block from its spec."""
    kind = spec.get("type")
    try:
        if kind == "conv3d":
            kw = {k: _tuple(spec[k]) for k in ("kernel_size", "stride", "padding", "output_padding", "dilation")
                  if k in spec}
            return BasicConv(spec["in"], spec["out"], deconv=spec.get("deconv", False), is_3d=True,
                             bn=spec.get("bn", True), relu=spec.get("relu", True), **kw)
        if kind == "apc":
            return Conv3dNormActReduced(spec["in"], spec["out"], kernel_size=spec.get("kernel_size", 3),
                                        kernel_disp=spec["kernel_disp"], hidden=spec.get("hidden"))
        if kind == "res3d":
            return ResnetBasicBlock(spec["channels"], spec["channels"], is_3d=True)
        if kind == "feature_att":
            return FeatureAtt(spec["cv"], spec["feat"], spec.get("hidden"))
        if kind == "disparity_attention":
            return CostVolumeDisparityAttention(spec["d_model"], spec["heads"], spec["ff"], spec["layers"],
                                                spec["max_len"], spec.get("heads_as_sequence", False))
        if kind == "upsample":
            return nn.Upsample(scale_factor=_tuple(spec["scale_factor"]), mode=spec.get("mode", "trilinear"),
                               align_corners=spec.get("align_corners"))
        if kind == "raw_conv3d":
            return nn.Conv3d(spec["in"], spec["out"], _tuple(spec["kernel_size"]), stride=_tuple(spec.get("stride", 1)),
                             padding=_tuple(spec.get("padding", 0)), groups=spec.get("groups", 1),
                             bias=spec.get("bias", True))
        if kind == "bn3d":
            return nn.BatchNorm3d(spec["channels"])
        if kind == "identity":
            return nn.Identity()
    except KeyError as exc:
        raise ConfigError(f"volume block layer {spec}: missing key {exc}") from None
    raise ConfigError(f"volume block layer type {kind!r}: expected one of {', '.join(LAYER_TYPES)}")


def build_block(spec: dict[str, Any]) -> nn.Module | None:
    """The module of one ``volume_blocks`` entry (None for ``absent``)."""
    kind = spec.get("kind")
    if kind == "identity":
        return nn.Identity()
    if kind == "absent":
        return None
    if kind == "chain":
        layers = [build_layer(s) for s in spec.get("layers", [])]
        return FeatureSequential(*layers) if spec.get("keys", "layers") == "index" else FeatureChain(layers)
    if kind == "merge":
        return MergeBlock([build_layer(s) for s in spec.get("upsample", [])], spec.get("op", "sum"),
                          [build_layer(s) for s in spec.get("out", [])])
    raise ConfigError(f"volume block kind {kind!r}: expected identity, absent, chain or merge")


def apply_volume_blocks(model: nn.Module, blocks: dict[str, dict[str, Any]]) -> None:
    """Replace (or add, or drop) the named slots of ``model`` by the blocks their specs describe."""
    for slot, spec in blocks.items():
        parent_name, _, attr = slot.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            raise ConfigError(f"volume_blocks: slot {slot!r} does not exist in this student") from None
        block = build_block(spec)
        if block is None:
            if attr in parent._modules:
                del parent._modules[attr]
            setattr(parent, attr, None)
        else:
            setattr(parent, attr, block)
