"""FoundationStereo: the full teacher, with the official state-dict layout and forward semantics."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .config import TeacherConfig
from .context import ContextNet
from .cost_volume import GwcVolume, Hourglass, build_concat_volume, disparity_regression
from .dinov2 import VIT_SPECS
from .features import StereoFeature, build_edgenext, normalize_image
from .geometry import GeometryEncoding, PairCorrelation
from .layers import (
    BasicConv,
    BasicConvIN,
    ChannelAttentionEnhancement,
    FeatureAtt,
    ResnetBasicBlock,
    SpatialAttentionExtractor,
)
from .outputs import StereoOutput
from .update import ConvexUpsampler, SelectiveMultiUpdateBlock

EDGENEXT_S_CHANS = (48, 96, 160, 304)
EDGENEXT_S_DEPTHS = (3, 3, 9, 3)
CV_GROUPS = 8
VOLUME_DIM = 28
CONCAT_DIM = 12


def _stem(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        BasicConvIN(cin, cout, kernel_size=3, stride=2, padding=1),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
        nn.InstanceNorm2d(cout),
        nn.ReLU(),
    )


def autocast_ctx(enabled: bool, device: torch.device):
    """fp16 autocast on CUDA when enabled; a no-op elsewhere (the official model autocasts on CUDA only)."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


class FoundationStereo(nn.Module):
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
        self.stem_2 = _stem(3, 32)
        self.stem_4 = _stem(32, 48)  # unused by the official forward, present in the checkpoint
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
        self.classifier = nn.Sequential(
            BasicConv(vd, vd // 2, kernel_size=3, padding=1, is_3d=True),
            ResnetBasicBlock(vd // 2, vd // 2, is_3d=True),
            nn.Conv3d(vd // 2, 1, kernel_size=7, padding=3),
        )
        # Parameterless float32 correlations (no checkpoint keys); modules so exported nodes are named.
        self.gwc = GwcVolume(self.cv_group)
        self.pair_correlation = PairCorrelation()

    @property
    def volume_scale(self) -> int:
        """Image-to-cost-volume resolution ratio."""
        return 4

    def upsample_disp(self, disp: torch.Tensor, mask_feat: torch.Tensor, stem_2x: torch.Tensor) -> torch.Tensor:
        """Convex upsampling of a 1/4 disparity to full resolution (float32 result)."""
        with autocast_ctx(self.cfg.mixed_precision, disp.device):
            up = self._upsampler[0](disp, mask_feat, stem_2x)
        return up.float()

    def forward(
        self,
        image1: torch.Tensor,
        image2: torch.Tensor,
        iters: int = 12,
        test_mode: bool = False,
        init_disp: torch.Tensor | None = None,
        low_memory: bool = False,
        return_intermediates: bool = False,
    ):
        """Estimate the left-view disparity; see the class docstring for the outputs."""
        b = image1.shape[0]
        dev = image1.device
        amp = self.cfg.mixed_precision
        image1 = normalize_image(image1)
        image2 = normalize_image(image2)
        d4 = self.max_disp // 4
        with autocast_ctx(amp, dev):
            pyramid, vit_feat, _ = self.feature(torch.cat([image1, image2], dim=0))
            vit_feat = vit_feat[:b]
            feats_l = [f[:b] for f in pyramid]
            feats_r = [f[b:] for f in pyramid]
            stem_2x = self.stem_2(image1)
            gwc = self.gwc(feats_l[0], feats_r[0], d4)
            concat = build_concat_volume(self.proj_cmb(feats_l[0]), self.proj_cmb(feats_r[0]), d4)
            cost_volume = torch.cat([gwc.to(concat.dtype), concat], dim=1)
            vol = self.corr_stem(cost_volume)
            vol = self.corr_feature_att(vol, feats_l[0])
            vol = self.cost_agg(vol, feats_l)
            logits = self.classifier(vol).squeeze(1)
            prob = F.softmax(logits, dim=1)
            if init_disp is None:
                init_disp = disparity_regression(prob, d4)
            cnet_out = self.cnet(image1, vit_feat)
            net_list = [torch.tanh(x[0]) for x in cnet_out]
            inp_list = [torch.relu(x[1]) for x in cnet_out]
            inp_list = [self.cam(x) * x for x in inp_list]
            att = [self.sam(x) for x in inp_list]

        geo = GeometryEncoding(
            feats_l[0].float(), feats_r[0].float(), vol.float(), self.cfg.corr_levels, self.cfg.corr_radius,
            correlation=self.pair_correlation,
        )
        disp = init_disp.float()
        disp_preds, hidden_states, disp_low = [], [], []
        upsample_every = return_intermediates or not test_mode
        disp_up = None
        for itr in range(iters):
            disp = disp.detach()
            geo_feat = geo.lookup(disp)
            with autocast_ctx(amp, dev):
                net_list, mask_feat, delta = self.update_block(net_list, inp_list, geo_feat, disp, att)
            disp = disp + delta.float()
            if return_intermediates:
                hidden_states.append(list(net_list))
                disp_low.append(disp)
            if upsample_every or itr == iters - 1:
                disp_up = self.upsample_disp(disp, mask_feat.float(), stem_2x.float())
                disp_preds.append(disp_up)

        if return_intermediates:
            return StereoOutput(
                disp=disp_up,
                init_disp=init_disp,
                disp_preds=disp_preds,
                features_left=feats_l,
                features_right=feats_r,
                vit_feat=vit_feat,
                cost_volume=cost_volume,
                filtered_volume=vol,
                cost_logits=logits,
                hidden_states=hidden_states,
                disp_lowres=disp_low,
                volume_scale=4,
            )
        if test_mode:
            return disp_up
        return init_disp, disp_preds
