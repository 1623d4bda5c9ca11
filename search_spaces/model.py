"""StudentStereo: the teacher's structure without the ViT, every width from a StudentConfig."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from teacher.cost_volume import Hourglass, build_concat_volume, build_gwc_volume, disparity_regression
from teacher.features import StereoFeature, build_edgenext, build_timm_backbone, normalize_image
from teacher.geometry import GeometryEncoding, PairCorrelation
from teacher.layers import (
    BasicConv,
    BasicConvIN,
    ChannelAttentionEnhancement,
    FeatureAtt,
    Float32Island,
    ResnetBasicBlock,
    SpatialAttentionExtractor,
)
from teacher.model import autocast_ctx
from teacher.outputs import StereoOutput
from teacher.update import ConvexUpsampler, SelectiveMultiUpdateBlock

from .config import StudentConfig


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


class StudentStereo(nn.Module):
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
        self.stem_2 = nn.Sequential(
            BasicConvIN(3, 32, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(32, 32, 3, 1, 1, bias=False),
            nn.InstanceNorm2d(32),
            nn.ReLU(),
        )
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
        self.classifier = nn.Sequential(
            BasicConv(vd, vd // 2, kernel_size=3, padding=1, is_3d=True),
            ResnetBasicBlock(vd // 2, vd // 2, is_3d=True),
            nn.Conv3d(vd // 2, 1, kernel_size=7, padding=3),
        )
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
            from .blocks import apply_volume_blocks

            apply_volume_blocks(self, cfg.volume_blocks)

    @property
    def volume_scale(self) -> int:
        """Image-to-cost-volume resolution ratio."""
        return self.cfg.volume_scale

    def forward(
        self,
        image1: torch.Tensor,
        image2: torch.Tensor,
        iters: int | None = None,
        test_mode: bool = False,
        init_disp: torch.Tensor | None = None,
        return_intermediates: bool = False,
    ):
        """Disparity of the left view; outputs as FoundationStereo.forward."""
        cfg = self.cfg
        iters = cfg.iters if iters is None else iters
        b = image1.shape[0]
        dev = image1.device
        amp = cfg.mixed_precision
        image1 = normalize_image(image1)
        image2 = normalize_image(image2)
        nd = cfg.max_disp // cfg.volume_scale
        with autocast_ctx(amp, dev):
            pyramid, _, _ = self.feature(torch.cat([image1, image2], dim=0))
            feats_l = [f[:b] for f in pyramid]
            feats_r = [f[b:] for f in pyramid]
            fl, fr = feats_l[self.base], feats_r[self.base]
            stem_2x = self.stem_2(image1)
            gwc = self.correlation(fl, fr, nd)
            if self.proj_cmb is not None:
                concat = build_concat_volume(self.proj_cmb(fl), self.proj_cmb(fr), nd)
                cost_volume = torch.cat([gwc.to(concat.dtype), concat], dim=1)
            else:
                cost_volume = gwc
            vol = self.corr_stem(cost_volume)
            vol = self.corr_feature_att(vol, fl)
            vol = self.cost_agg(vol, feats_l[self.base :])
            logits = self.classifier(vol).squeeze(1)
            if init_disp is None:
                init_disp = disparity_regression(F.softmax(logits, dim=1), nd)
            ctx = self.cnet(feats_l[self.base : self.base + cfg.gru_levels])
            net_list = [torch.tanh(x[0]) for x in ctx]
            inp_list = [torch.relu(x[1]) for x in ctx]
            inp_list = [self.cam(x) * x for x in inp_list]
            att = [self.sam(x) for x in inp_list]

        geo = GeometryEncoding(fl.float(), fr.float(), vol.float(), cfg.corr_levels, cfg.corr_radius,
                               correlation=self.pair_correlation)
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
                with autocast_ctx(amp, dev):
                    disp_up = self.upsampler(disp, mask_feat.float(), stem_2x.float()).float()
                disp_preds.append(disp_up)

        if return_intermediates:
            return StereoOutput(
                disp=disp_up,
                init_disp=init_disp,
                disp_preds=disp_preds,
                features_left=feats_l,
                features_right=feats_r,
                vit_feat=None,
                cost_volume=cost_volume,
                filtered_volume=vol,
                cost_logits=logits,
                hidden_states=hidden_states,
                disp_lowres=disp_low,
                volume_scale=cfg.volume_scale,
            )
        if test_mode:
            return disp_up
        return init_disp, disp_preds
