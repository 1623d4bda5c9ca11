"""The block decomposition of a student forward: the seven blocks, the fields each one's latency depends on
(its variant), the thin modules that run each block alone, and run_blocks composing them as the model does."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

import torch
from torch import nn

from compress.errors import ConfigError
from compress.export.onnx_export import check_image_size
from search_spaces import SearchSpace, StudentConfig, build_student
from search_spaces.config import WRITTEN_IF_SET
from teacher.features import normalize_image
from teacher.geometry import GeometryEncoding
from teacher.stages import StereoStages

BLOCKS: tuple[str, ...] = ("feature", "volume", "hourglass", "classifier", "context", "gru_iteration", "upsampler")
"""The blocks of a student forward, in execution order."""
OVERHEAD = "call_overhead"
"""Pseudo-block: one call of a trivial graph, the fixed cost every separately timed block pays."""
TABLE_FORMAT = "ffsc-latency-table/1"

# StudentConfig fields each block's effective fields are computed from (for enumerating a space).
_BLOCK_INPUT_FIELDS: dict[str, tuple[str, ...]] = {
    "feature": ("backbone", "backbone_dims", "backbone_depths", "backbone_heads", "feature_dim"),
    "volume": ("volume_scale", "max_disp", "cv_groups", "concat_dim", "volume_dim", "stem_blocks", "feature_dim",
               "backbone_dims"),
    "hourglass": ("volume_scale", "max_disp", "volume_dim", "hourglass_levels", "hourglass_widths", "apc_kernel",
                  "agg_blocks", "transformer_layers", "transformer_heads", "feature_dim", "backbone_dims"),
    "classifier": ("volume_scale", "max_disp", "volume_dim", "classifier_kernel"),
    "context": ("volume_scale", "max_disp", "volume_dim", "gru_levels", "hidden_dim", "corr_levels", "feature_dim",
                "backbone_dims"),
    "gru_iteration": ("volume_scale", "max_disp", "volume_dim", "gru_levels", "hidden_dim", "motion_dim",
                      "motion_corr_dim", "motion_disp_dim", "head_blocks", "corr_levels", "corr_radius"),
    "upsampler": ("volume_scale",),
}
# Fields a search space's repairs tie together (see search_spaces.space): enumerated jointly.
_COUPLED = ("volume_scale", "hourglass_levels", "hourglass_widths", "volume_dim", "gru_levels")


def pyramid_widths(cfg: StudentConfig) -> list[int]:
    """Channel widths of the student's feature pyramid at 1/4, 1/8, 1/16, 1/32."""
    if cfg.backbone == "edgenext":
        c = cfg.backbone_dims
        return [cfg.feature_dim, 2 * c[1], 2 * c[2], c[3]]
    with torch.device("meta"):
        return list(build_student(cfg.replace(layer_shapes={})).feature.d_out)


def block_fields(cfg: StudentConfig, block: str) -> dict:
    """The effective parameters a block's structure (hence latency) depends on, for one config."""
    if cfg.layer_shapes:
        raise ConfigError(f"{cfg.name} has pruned layer widths; latency tables cover search-space configs, time "
                          "pruned students directly with compress.latency.measure")
    d = pyramid_widths(cfg)
    base = 0 if cfg.volume_scale == 4 else 1
    common = {"volume_scale": cfg.volume_scale, "mixed_precision": cfg.mixed_precision}
    if block == "feature":
        return {"mixed_precision": cfg.mixed_precision, "backbone": cfg.backbone, "backbone_dims": cfg.backbone_dims,
                "backbone_depths": cfg.backbone_depths, "backbone_heads": cfg.backbone_heads,
                "feature_dim": cfg.feature_dim}
    if block == "volume":
        return {**common, "max_disp": cfg.max_disp, "cv_groups": cfg.cv_groups, "concat_dim": cfg.concat_dim,
                "volume_dim": cfg.volume_dim, "stem_blocks": cfg.stem_blocks, "feature_width": d[base]}
    if block == "hourglass":
        att = {"transformer_layers": cfg.transformer_layers}
        if cfg.transformer_layers:
            att["transformer_heads"] = cfg.transformer_heads
        return {**common, "max_disp": cfg.max_disp, "volume_dim": cfg.volume_dim,
                "hourglass_widths": cfg.hourglass_widths, "apc_kernel": cfg.apc_kernel, "agg_blocks": cfg.agg_blocks,
                **att, "feature_widths": d[base: base + cfg.hourglass_levels + 1]}
    if block == "classifier":
        # Keyed like the config: a table measured before the field existed still serves the default kernel.
        kernel = {} if cfg.classifier_kernel == WRITTEN_IF_SET["classifier_kernel"] else {
            "classifier_kernel": cfg.classifier_kernel}
        return {**common, "max_disp": cfg.max_disp, "volume_dim": cfg.volume_dim, **kernel}
    if block == "context":
        return {**common, "max_disp": cfg.max_disp, "volume_dim": cfg.volume_dim, "gru_levels": cfg.gru_levels,
                "hidden_dim": cfg.hidden_dim, "corr_levels": cfg.corr_levels,
                "feature_widths": d[base: base + cfg.gru_levels]}
    if block == "gru_iteration":
        return {**common, "max_disp": cfg.max_disp, "volume_dim": cfg.volume_dim, "gru_levels": cfg.gru_levels,
                "hidden_dim": cfg.hidden_dim, "motion_dim": cfg.motion_dim, "motion_corr_dim": cfg.motion_corr_dim,
                "motion_disp_dim": cfg.motion_disp_dim, "head_blocks": cfg.head_blocks,
                "corr_levels": cfg.corr_levels, "corr_radius": cfg.corr_radius}
    if block == "upsampler":
        return common
    raise ConfigError(f"unknown block {block!r}; blocks: {', '.join(BLOCKS)}")


@dataclass(frozen=True)
class BlockVariant:
    """One block with its effective fields at one image shape: the unit a latency table stores."""

    block: str
    fields: dict
    image_shape: tuple[int, int, int, int]

    def identity(self) -> str:
        """Canonical JSON of block, fields and shape (hashable, backend-independent)."""
        return json.dumps({"block": self.block, "fields": self.fields, "image": list(self.image_shape)},
                          sort_keys=True)


def block_variants(cfg: StudentConfig, height: int, width: int, batch: int = 1) -> list[BlockVariant]:
    """The seven block variants a config runs at an image size, in execution order."""
    check_image_size(height, width)
    return [BlockVariant(b, block_fields(cfg, b), (batch, 3, height, width)) for b in BLOCKS]


def space_block_variants(
    space: SearchSpace, height: int, width: int, batch: int = 1
) -> dict[str, tuple[BlockVariant, StudentConfig]]:
    """Every distinct block variant a search space can produce, each with a config that contains it.

    Per block, only the dimensions that feed its fields are enumerated (with the coupled dimensions the
    space's repairs tie together); the others stay at their first value.
    """
    found: dict[str, tuple[BlockVariant, StudentConfig]] = {}
    first = {d.name: d.values()[0] for d in space.dimensions}
    for block in BLOCKS:
        inputs = set(_BLOCK_INPUT_FIELDS[block])
        if inputs & set(_COUPLED):
            inputs |= set(_COUPLED)
        dims = [d for d in space.dimensions if d.name in inputs]
        for combo in itertools.product(*(d.values() for d in dims)):
            values = {**first, **{d.name: v for d, v in zip(dims, combo, strict=True)}}
            try:
                cfg = space.config_from_values(values)
            except ConfigError:
                continue  # an invalid combination the space never samples
            variant = BlockVariant(block, block_fields(cfg, block), (batch, 3, height, width))
            found.setdefault(variant.identity(), (variant, cfg))
    return found


class _Block(nn.Module):
    """One stage of a student, timed on its own: a thin module calling the student's own stage method."""

    def __init__(self, student: StereoStages) -> None:
        super().__init__()
        self.model = student


class FeatureBlock(_Block):
    """(left, right) -> left pyramid, right pyramid (finest first) and the left 1/2 stem feature."""

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats_l, feats_r, _, stem_2x = self.model.encode(normalize_image(left), normalize_image(right))
        return (*feats_l, *feats_r, stem_2x)


class VolumeBlock(_Block):
    """(left, right features at the volume resolution) -> the stemmed, feature-gated cost volume."""

    def forward(self, fl: torch.Tensor, fr: torch.Tensor) -> torch.Tensor:
        return self.model.build_volume(fl, fr)[1]


class HourglassBlock(_Block):
    """(volume, left features from the volume resolution down) -> filtered volume."""

    def forward(self, vol: torch.Tensor, *feats: torch.Tensor) -> torch.Tensor:
        return self.model.filter_volume(vol, list(feats))


class ClassifierBlock(_Block):
    """filtered volume -> initial disparity (soft-argmin)."""

    def forward(self, vol: torch.Tensor) -> torch.Tensor:
        return self.model.initial_disparity(vol)[1]


class ContextBlock(_Block):
    """(filtered volume, left/right volume features, left pyramid) -> GRU states, attention, lookup pyramids."""

    def forward(self, vol: torch.Tensor, fl: torch.Tensor, fr: torch.Tensor, *feats_l: torch.Tensor):
        net, inp, att = self.model.context(list(feats_l))
        geo = self.model.geometry(fl, fr, vol)
        return (*net, *inp, *att, *geo.volume_pyramid, *geo.corr_pyramid)


class GruIterationBlock(_Block):
    """(disparity, GRU states, context, attention, lookup pyramids) -> new disparity, states, mask feature."""

    def forward(self, disp: torch.Tensor, *state: torch.Tensor):
        n, c = self.model.update_block.n_levels, self.model.cfg.corr_levels
        net, inp, att = list(state[:n]), list(state[n: 2 * n]), list(state[2 * n: 3 * n])
        pyramids = state[3 * n:]
        geo = GeometryEncoding(pyramids[:c], pyramids[c:], self.model.cfg.corr_radius)
        disp, net, mask_feat = self.model.refine_step(geo, disp, net, inp, att)
        return (disp, *net, mask_feat)


class UpsamplerBlock(_Block):
    """(low-resolution disparity, mask feature, stem feature) -> full-resolution disparity."""

    def forward(self, disp: torch.Tensor, mask_feat: torch.Tensor, stem_2x: torch.Tensor) -> torch.Tensor:
        return self.model.upsample(disp, mask_feat, stem_2x)


class OverheadProbe(nn.Module):
    """A trivial graph: timed alone it is the fixed cost every separately timed block pays."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1.0


_BLOCK_CLASSES = {"feature": FeatureBlock, "volume": VolumeBlock, "hourglass": HourglassBlock,
                  "classifier": ClassifierBlock, "context": ContextBlock, "gru_iteration": GruIterationBlock,
                  "upsampler": UpsamplerBlock}


def student_blocks(student: nn.Module) -> dict[str, nn.Module]:
    """The seven blocks of a StudentStereo, sharing its weights."""
    return {name: cls(student) for name, cls in _BLOCK_CLASSES.items()}


@torch.no_grad()
def run_blocks(
    blocks: dict[str, nn.Module], left: torch.Tensor, right: torch.Tensor, iters: int
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, ...]]]:
    """Run the blocks in the order the model's ``run`` composes its stages (test mode); returns the disparity
    and each block's inputs (its last call's, for the GRU iteration)."""
    model = blocks["feature"].model
    inputs: dict[str, tuple[torch.Tensor, ...]] = {"feature": (left, right)}
    *pyramids, stem_2x = blocks["feature"](left, right)
    feats_l, feats_r = pyramids[: len(pyramids) // 2], pyramids[len(pyramids) // 2:]
    fl, fr = feats_l[model.base], feats_r[model.base]
    inputs["volume"] = (fl, fr)
    inputs["hourglass"] = (blocks["volume"](fl, fr), *feats_l[model.base:])
    vol = blocks["hourglass"](*inputs["hourglass"])
    inputs["classifier"] = (vol,)
    disp = blocks["classifier"](vol).float()
    inputs["context"] = (vol, fl, fr, *feats_l)
    state, n = blocks["context"](*inputs["context"]), model.update_block.n_levels
    net, rest = list(state[:n]), state[n:]
    mask_feat = None
    for _ in range(iters):
        inputs["gru_iteration"] = (disp, *net, *rest)
        disp, *net, mask_feat = blocks["gru_iteration"](*inputs["gru_iteration"])
    inputs["upsampler"] = (disp, mask_feat, stem_2x)
    return blocks["upsampler"](*inputs["upsampler"]), inputs
