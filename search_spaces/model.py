"""StudentStereo: the teacher's structure without the ViT, every width from a StudentConfig."""

from __future__ import annotations

import torch
from torch import nn

from compress.pruning_rules import FamilyRules, names_of
from teacher.cost_volume import Hourglass, build_gwc_volume
from teacher.features import StereoFeature, build_edgenext, build_timm_backbone
from teacher.geometry import PairCorrelation
from teacher.layers import (
    BasicConv,
    ChannelAttentionEnhancement,
    FeatureAtt,
    Float32Island,
    ResnetBasicBlock,
    SpatialAttentionExtractor,
)
from teacher.pruning import family_rules
from teacher.stages import StereoStages, disparity_classifier, image_stem
from teacher.update import ConvexUpsampler, SelectiveMultiUpdateBlock

from .blocks import apply_volume_blocks
from .config import StudentConfig
from .layer_shapes import apply_layer_shapes
from .pretrained import load_backbone_weights


class GroupwiseCorrelation(Float32Island):
    """The group-wise correlation volume as a module, so pruning can see where feature channels end.

    The correlation reduces over the channels of each group, so its output width is ``num_groups`` whatever
    the feature width; ``in_channels`` records the feature width, which pruning changes in whole groups.
    """

    def __init__(self, in_channels: int, num_groups: int, normalize: bool = True) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_groups = num_groups
        self.normalize = normalize

    def forward(self, left: torch.Tensor, right: torch.Tensor, max_disp: int) -> torch.Tensor:
        return build_gwc_volume(left, right, max_disp, self.num_groups, self.normalize)


class SharedContext(nn.Module):
    """Context from the (left) feature pyramid itself: a hidden and a context conv per GRU level."""

    def __init__(self, feat_dims: list[int], hidden_dim: int) -> None:
        super().__init__()
        self.net = nn.ModuleList(nn.Conv2d(c, hidden_dim, 3, padding=1) for c in feat_dims)
        self.inp = nn.ModuleList(nn.Conv2d(c, hidden_dim, 3, padding=1) for c in feat_dims)

    def forward(self, feats: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(n(f), i(f)) for n, i, f in zip(self.net, self.inp, feats, strict=True)]


def _backbone(cfg: StudentConfig) -> tuple[nn.Module, tuple[int, int, int, int]]:
    if cfg.backbone == "edgenext":
        model = build_edgenext(cfg.backbone_dims, cfg.backbone_depths, heads=(cfg.backbone_heads,) * 4)
        return model, tuple(cfg.backbone_dims)
    model = build_timm_backbone(cfg.backbone)
    chans = tuple(info["num_chs"] for info in model.feature_info[-4:])
    if not hasattr(model, "stem") or not hasattr(model, "stages") or len(chans) != 4:
        raise ValueError(f"timm model {cfg.backbone} has no stem + 4 stages")
    return model, chans


class StudentStereo(StereoStages):
    """A Fast-FoundationStereo-style student with the teacher's forward contract.

    ``forward(image1, image2, iters=None, test_mode=False, init_disp=None, return_intermediates=False)``;
    ``iters`` defaults to ``cfg.iters`` (the count fixed at export time).
    """

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        s = cfg.volume_scale
        self.base = 0 if s == 4 else 1  # pyramid index of the volume resolution
        backbone, chans = _backbone(cfg)
        self.feature = StereoFeature(backbone, chans, vit_size=None, out4=cfg.feature_dim, head="conv1x1")
        d_out = self.feature.d_out
        feats = d_out[self.base :]
        vd = cfg.volume_dim
        self.correlation = GroupwiseCorrelation(feats[0], cfg.cv_groups, cfg.gwc_normalize)
        self.proj_cmb = nn.Conv2d(feats[0], cfg.concat_dim // 2, kernel_size=1) if cfg.concat_dim else None
        self.stem_2 = image_stem(3, 32)
        self.corr_stem = nn.Sequential(
            nn.Conv3d(cfg.cv_groups + cfg.concat_dim, vd, kernel_size=1),
            BasicConv(vd, vd, kernel_size=3, padding=1, is_3d=True),
            *[ResnetBasicBlock(vd, vd, is_3d=True) for _ in range(cfg.stem_blocks)],
        )
        self.corr_feature_att = FeatureAtt(vd, feats[0])
        self.cost_agg = Hourglass(
            (vd, *cfg.hourglass_widths),
            feats,
            cfg.max_disp,
            kernel_disp=cfg.apc_kernel,
            att_layers=cfg.transformer_layers,
            att_heads=cfg.transformer_heads,
            agg_blocks=cfg.agg_blocks,
            base_scale=s,
            heads_as_sequence=cfg.attention_heads_as_sequence,
        )
        self.classifier = disparity_classifier(vd, cfg.classifier_kernel)
        n = cfg.gru_levels
        h = cfg.hidden_dim
        self.cnet = SharedContext(feats[:n], h)
        self.cam = ChannelAttentionEnhancement(h)
        self.sam = SpatialAttentionExtractor()
        geo_planes = cfg.corr_levels * (2 * cfg.corr_radius + 1) * (vd + 1)
        self.update_block = SelectiveMultiUpdateBlock(
            [h] * n,
            [h] * n,
            geo_planes,
            motion_dim=cfg.motion_dim,
            corr_dims=(cfg.motion_corr_dim, cfg.motion_corr_dim),
            disp_dims=(cfg.motion_disp_dim, cfg.motion_disp_dim),
            head_blocks=cfg.head_blocks,
            mask_dims=(64, 32),
            motion_conv_kernel=cfg.motion_conv_kernel,
        )
        self.upsampler = ConvexUpsampler(mask_dim=32, stem_dim=32, factor=s)
        self.pair_correlation = PairCorrelation()  # a module so its float32 nodes are named in ONNX
        if cfg.volume_blocks:
            apply_volume_blocks(self, cfg.volume_blocks)

    @property
    def volume_scale(self) -> int:
        """Image-to-cost-volume resolution ratio."""
        return self.cfg.volume_scale

    @property
    def group_correlation(self) -> nn.Module:
        """The group-wise correlation module."""
        return self.correlation

    @property
    def convex_upsampler(self) -> ConvexUpsampler:
        """The convex upsampler (its factor is the volume scale)."""
        return self.upsampler

    def pruning_rules(self) -> FamilyRules:
        """A student prunes every part; a timm backbone keeps its stage widths (timm derives split sizes, heads and
        positional projections from them), so only its MLP hidden widths are pruned."""
        parts = {
            "backbone": ("feature",),
            "cost_filtering": ("proj_cmb", "corr_stem", "corr_feature_att", "cost_agg", "classifier"),
            "refinement": ("cnet", "cam", "sam", "update_block", "upsampler", "stem_2"),
        }
        restricted = {"feature.stem": (), "feature.stages": ("mlp.fc1",)}
        return family_rules(self, "student", parts, "upsampler.spx_gru", restricted=restricted,
                            correlations=names_of(self, GroupwiseCorrelation))

    def context_features(self, feats_l: list[torch.Tensor], image: torch.Tensor | None = None,
                         vit_feat: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The shared context reads the left pyramid from the volume's resolution, one level per GRU level."""
        return self.cnet(feats_l[self.base : self.base + self.cfg.gru_levels])

    def forward(self, image1: torch.Tensor, image2: torch.Tensor, iters: int | None = None, test_mode: bool = False,
                init_disp: torch.Tensor | None = None, return_intermediates: bool = False):
        """Disparity of the left view; outputs as FoundationStereo.forward."""
        iters = self.cfg.iters if iters is None else iters
        return self.run(image1, image2, iters, test_mode, init_disp, return_intermediates)


def build_student(cfg: StudentConfig, pretrained: bool = True) -> StudentStereo:
    """The student network for a config, with any recorded per-layer widths applied.

    ``pretrained``: load ``cfg.backbone_weights`` (if set) into the backbone; off when saved weights follow.
    """
    model = StudentStereo(cfg)
    if cfg.layer_shapes:
        apply_layer_shapes(model, cfg.layer_shapes)
    if pretrained and cfg.backbone_weights:
        load_backbone_weights(model, cfg.backbone_weights)
    return model
