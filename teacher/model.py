"""FoundationStereo: the full teacher, with the official state-dict layout and forward semantics."""

from __future__ import annotations

import torch
from torch import nn

from compress.pruning_rules import FamilyRules

from .config import TeacherConfig
from .context import ContextNet
from .cost_volume import GwcVolume, Hourglass
from .dinov2 import VIT_SPECS
from .features import StereoFeature, build_edgenext
from .geometry import PairCorrelation
from .layers import BasicConv, ChannelAttentionEnhancement, FeatureAtt, ResnetBasicBlock, SpatialAttentionExtractor
from .pruning import family_rules
from .stages import StereoStages, autocast_ctx, disparity_classifier, image_stem
from .update import ConvexUpsampler, SelectiveMultiUpdateBlock

__all__ = ["FoundationStereo", "autocast_ctx"]

EDGENEXT_S_CHANS = (48, 96, 160, 304)
EDGENEXT_S_DEPTHS = (3, 3, 9, 3)
CV_GROUPS = 8
VOLUME_DIM = 28
CONCAT_DIM = 12


class FoundationStereo(StereoStages):
    """FoundationStereo (CVPR 2025), clean-room: loads the official checkpoints strictly.

    ``forward(image1, image2, iters=12, test_mode=False, init_disp=None)`` takes RGB float 0..255 with H
    and W divisible by 32. Test mode returns the B x 1 x H x W disparity; training mode returns the 1/4
    initial disparity and the list of per-iteration full-resolution predictions.
    ``return_intermediates=True`` returns a :class:`StereoOutput` with everything distillation reads.
    """

    def __init__(self, cfg: TeacherConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hidden = cfg.hidden_dims
        h0 = hidden[0]
        n = cfg.n_gru_layers
        self.cv_group = CV_GROUPS
        self.volume_dim = VOLUME_DIM
        self.max_disp = cfg.max_disp
        geo_planes = cfg.corr_levels * (2 * cfg.corr_radius + 1) * (VOLUME_DIM + 1)
        vit_dim = VIT_SPECS[cfg.vit_size].dpt_features // 2

        self.cnet = ContextNet(hidden, hidden, n_levels=3, vit_dim=vit_dim, with_unused=True)
        self.update_block = SelectiveMultiUpdateBlock(
            [h0] * n, [h0] * n, geo_planes, motion_dim=h0, mask_dims=(64, 32)
        )
        self.sam = SpatialAttentionExtractor()
        self.cam = ChannelAttentionEnhancement(h0)
        # Never called by the official forward; kept so official checkpoints load strictly.
        self.context_zqr_convs = nn.ModuleList(nn.Conv2d(hidden[i], hidden[i] * 3, 3, padding=1) for i in range(n))
        self.feature = StereoFeature(
            build_edgenext(EDGENEXT_S_CHANS, EDGENEXT_S_DEPTHS), EDGENEXT_S_CHANS, vit_size=cfg.vit_size
        )
        d_out = self.feature.d_out
        self.proj_cmb = nn.Conv2d(d_out[0], CONCAT_DIM, kernel_size=1)
        self.stem_2 = image_stem(3, 32)
        self.stem_4 = image_stem(32, 48)  # unused by the official forward, present in the checkpoint
        upsampler = ConvexUpsampler(mask_dim=32, stem_dim=32, factor=4)
        self.spx_2_gru = upsampler.spx_2_gru
        self.spx_gru = upsampler.spx_gru
        self._upsampler = [upsampler]  # shares the two modules above; a list keeps it out of state_dict
        vd = VOLUME_DIM
        self.corr_stem = nn.Sequential(
            nn.Conv3d(CV_GROUPS + 2 * CONCAT_DIM, vd, kernel_size=1),
            BasicConv(vd, vd, kernel_size=3, padding=1, is_3d=True),
            ResnetBasicBlock(vd, vd, is_3d=True),
            ResnetBasicBlock(vd, vd, is_3d=True),
        )
        self.corr_feature_att = FeatureAtt(vd, d_out[0])
        self.cost_agg = Hourglass(
            (vd, vd * 2, vd * 4, vd * 6), d_out, cfg.max_disp, kernel_disp=17, att_layers=4, att_heads=4,
            heads_as_sequence=True,
        )
        self.classifier = disparity_classifier(vd)
        # Parameterless float32 correlations (no checkpoint keys); modules so exported nodes are named.
        self.gwc = GwcVolume(self.cv_group)
        self.pair_correlation = PairCorrelation()

    @property
    def volume_scale(self) -> int:
        """Image-to-cost-volume resolution ratio."""
        return 4

    @property
    def group_correlation(self) -> nn.Module:
        """The group-wise correlation module (``gwc``, its official name)."""
        return self.gwc

    @property
    def convex_upsampler(self) -> ConvexUpsampler:
        """The upsampler whose modules sit at the top level of the official checkpoint."""
        return self._upsampler[0]

    def pruning_rules(self) -> FamilyRules:
        """The teacher prunes only its refinement; the DINOv2 ViT is frozen and left out of the trace."""
        parts = ("cnet.outputs04", "cnet.outputs08", "cnet.outputs16", "cam", "sam", "update_block", "spx_2_gru",
                 "spx_gru", "stem_2")
        return family_rules(self, "teacher", {"refinement": parts}, "spx_gru", frozen=("feature.dino",))

    def context_features(self, feats_l: list[torch.Tensor], image: torch.Tensor,
                         vit_feat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The context network reads the normalised left image and the ViT feature."""
        return self.cnet(image, vit_feat)

    def forward(self, image1: torch.Tensor, image2: torch.Tensor, iters: int = 12, test_mode: bool = False,
                init_disp: torch.Tensor | None = None, low_memory: bool = False, return_intermediates: bool = False):
        """Estimate the left-view disparity; see the class docstring for the outputs."""
        return self.run(image1, image2, iters, test_mode, init_disp, return_intermediates)
