"""The stages every FoundationStereo-family model runs, and the one forward that composes them.

Teacher and students differ in how they build a few modules (a ViT or not, the context network, widths),
not in how a disparity is computed: :class:`StereoStages` holds that computation once, one method per
stage (encode, build_volume, filter_volume, initial_disparity, context, geometry, refine_step / refine,
upsample). ``run`` composes them for ``forward``; the latency predictor times the same methods one by one.
None of them makes a host tensor or reads a value back, so a whole forward can be captured in a CUDA graph.

Precision: every stage runs under :func:`precision_ctx`, and the caller decides. A precision set on the model
(``use_precision(model, 'fp32' | 'fp16' | 'bf16')``, as latency measurement, distillation and export do) is
what the stages run in, whatever autocast surrounds them; with none set, an autocast the caller already has
open is left alone, and only when nobody chose does the model's own ``mixed_precision`` apply (fp16 on CUDA,
the official model's behaviour). An ONNX export with no precision set traces float32: fp16 graphs are made
from the float32 one (``compress.export.fp16``, TensorRT), which keeps the float32 islands.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .cost_volume import DisparityRegression, build_concat_volume
from .features import normalize_image
from .geometry import GeometryEncoding
from .layers import BasicConv, BasicConvIN, ResnetBasicBlock
from .outputs import StereoOutput
from .update import ConvexCombination, DisparityUpdate

PRECISIONS = ("fp32", "fp16", "bf16")
"""Precisions a caller may set on a model (None = not chosen: see precision_ctx)."""
PRECISION_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_AUTOCAST: dict[str, torch.dtype] = {"cuda": torch.float16}
"""Autocast dtype per device type of a ``mixed_precision`` model that nobody chose a precision for: the official
model autocasts to fp16 on CUDA only (tests patch in a CPU entry to exercise the rule on CPU)."""
_AUTOCAST_DEVICES = ("cuda", "cpu")


def precision_ctx(precision: str | None, mixed_precision: bool, device: torch.device
                  ) -> contextlib.AbstractContextManager:
    """The autocast a stage runs under on ``device``: the chosen precision, else the caller's, else the model's."""
    if device.type not in _AUTOCAST_DEVICES:  # e.g. the meta device used for counting has no autocast
        return contextlib.nullcontext()
    if precision is not None:
        # Entered inside the caller's autocast, this overrides it: fp32 must switch an outer autocast off.
        if precision == "fp32":
            return torch.autocast(device_type=device.type, enabled=False)
        return torch.autocast(device_type=device.type, dtype=PRECISION_DTYPES[precision])
    dtype = DEFAULT_AUTOCAST.get(device.type) if mixed_precision else None
    if dtype is None or torch.is_autocast_enabled(device.type) or torch.onnx.is_in_onnx_export():
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def autocast_ctx(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager:
    """A ``mixed_precision`` model's own autocast when no caller chose a precision (fp16 on CUDA)."""
    return precision_ctx(None, enabled, device)


@contextlib.contextmanager
def use_precision(model: nn.Module, precision: str | None) -> Iterator[None]:
    """Run every :class:`StereoStages` inside ``model`` at ``precision`` within the block (None: unset)."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected None or one of {PRECISIONS}")
    stages = [m for m in model.modules() if isinstance(m, StereoStages)]
    saved = [m.precision for m in stages]
    for m in stages:
        m.precision = precision
    try:
        yield
    finally:
        for m, old in zip(stages, saved, strict=True):
            m.precision = old


def image_stem(cin: int, cout: int) -> nn.Sequential:
    """Stride-2 conv + instance norm stem (the 1/2-resolution feature the convex upsampler reads)."""
    return nn.Sequential(
        BasicConvIN(cin, cout, kernel_size=3, stride=2, padding=1),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
        nn.InstanceNorm2d(cout),
        nn.ReLU(),
    )


def disparity_classifier(volume_dim: int, kernel: int = 7) -> nn.Sequential:
    """3-D head turning the filtered volume into one logit per disparity (its last conv ``kernel`` wide)."""
    half = volume_dim // 2
    return nn.Sequential(
        BasicConv(volume_dim, half, kernel_size=3, padding=1, is_3d=True),
        ResnetBasicBlock(half, half, is_3d=True),
        nn.Conv3d(half, 1, kernel_size=kernel, padding=kernel // 2),
    )


class StereoStages(nn.Module):
    """Base of FoundationStereo and StudentStereo: the stages as methods, ``run`` composing them.

    A subclass builds ``cfg`` (``max_disp``, ``mixed_precision``, ``corr_levels``, ``corr_radius``),
    ``feature``, ``stem_2``, ``proj_cmb`` (or None), ``corr_stem``, ``corr_feature_att``, ``cost_agg``,
    ``classifier``, ``cnet``, ``cam``, ``sam``, ``update_block`` and ``pair_correlation``, and provides the
    properties ``volume_scale`` (4 or 8), ``group_correlation`` (the group-wise correlation module),
    ``convex_upsampler`` and the method ``context_features(feats_l, image, vit_feat)`` (the raw
    (hidden, context) pair per GRU level, finest first).
    """

    base: int = 0
    """Index of the pyramid level at the cost volume's resolution."""

    precision: str | None = None
    """The precision a caller chose for the stages (set it with :func:`use_precision`); None = not chosen."""

    def __init__(self) -> None:
        super().__init__()
        # Parameterless float32 islands (no checkpoint keys): the disparity itself never passes through fp16,
        # in PyTorch under autocast and in an fp16-cast ONNX graph alike, where they are named modules.
        self.disparity_regression = DisparityRegression()
        self.disparity_update = DisparityUpdate()
        self.convex_combination = ConvexCombination()

    @property
    def volume_disparities(self) -> int:
        """Disparity levels of the cost volume."""
        return self.cfg.max_disp // self.volume_scale

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The autocast every stage runs under on ``device`` (see :func:`precision_ctx`)."""
        return precision_ctx(self.precision, self.cfg.mixed_precision, device)

    # --- stages ---------------------------------------------------------------------------------------
    def encode(self, image1: Tensor, image2: Tensor):
        """Normalised images -> left and right pyramids (finest first), left ViT feature (or None), stem."""
        b = image1.shape[0]
        with self.autocast(image1.device):
            pyramid, vit_feat, _ = self.feature(torch.cat([image1, image2], dim=0))
            stem_2x = self.stem_2(image1)
        vit_feat = None if vit_feat is None else vit_feat[:b]
        return [f[:b] for f in pyramid], [f[b:] for f in pyramid], vit_feat, stem_2x

    def build_volume(self, fl: Tensor, fr: Tensor) -> tuple[Tensor, Tensor]:
        """Volume-resolution features -> the raw cost volume and the stemmed, feature-gated one."""
        nd = self.volume_disparities
        with self.autocast(fl.device):
            cost_volume = self.group_correlation(fl, fr, nd)
            if self.proj_cmb is not None:
                concat = build_concat_volume(self.proj_cmb(fl), self.proj_cmb(fr), nd)
                cost_volume = torch.cat([cost_volume.to(concat.dtype), concat], dim=1)
            return cost_volume, self.corr_feature_att(self.corr_stem(cost_volume), fl)

    def filter_volume(self, vol: Tensor, feats: list[Tensor]) -> Tensor:
        """The hourglass; ``feats`` are the left features from the volume's resolution down."""
        with self.autocast(vol.device):
            return self.cost_agg(vol, feats)

    def initial_disparity(self, vol: Tensor) -> tuple[Tensor, Tensor]:
        """Filtered volume -> classifier logits (B x D x h x w) and their soft-argmin disparity."""
        with self.autocast(vol.device):
            logits = self.classifier(vol).squeeze(1)
        return logits, self.disparity_regression(logits, self.volume_disparities)

    def context(
        self, feats_l: list[Tensor], image: Tensor | None = None, vit_feat: Tensor | None = None
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Initial hidden states, context features and spatial attention per GRU level.

        Students read the left pyramid; the teacher's context network reads the normalised left image and
        the ViT feature instead.
        """
        with self.autocast(feats_l[0].device):
            ctx = self.context_features(feats_l, image, vit_feat)
            net = [torch.tanh(x[0]) for x in ctx]
            inp = [torch.relu(x[1]) for x in ctx]
            inp = [self.cam(x) * x for x in inp]
            return net, inp, [self.sam(x) for x in inp]

    def geometry(self, fl: Tensor, fr: Tensor, vol: Tensor) -> GeometryEncoding:
        """Lookup pyramids of the filtered volume and the all-pairs correlation (float32)."""
        return GeometryEncoding.build(fl.float(), fr.float(), vol.float(), self.cfg.corr_levels,
                                      self.cfg.corr_radius, correlation=self.pair_correlation)

    def refine_step(
        self, geo: GeometryEncoding, disp: Tensor, net: list[Tensor], inp: list[Tensor], att: list[Tensor]
    ) -> tuple[Tensor, list[Tensor], Tensor]:
        """One GRU iteration: the updated disparity (float32), hidden states and upsampling-mask feature."""
        disp = disp.detach()  # as the official model: no gradient through the disparity across iterations
        geo_feat = geo.lookup(disp)
        with self.autocast(disp.device):
            net, mask_feat, delta = self.update_block(net, inp, geo_feat, disp, att)
        return self.disparity_update(disp, delta), net, mask_feat

    def upsample(self, disp: Tensor, mask_feat: Tensor, stem_2x: Tensor) -> Tensor:
        """Convex upsampling of a volume-resolution disparity to full resolution (float32 result)."""
        with self.autocast(disp.device):
            logits = self.convex_upsampler.logits(mask_feat.float(), stem_2x.float())
        return self.convex_combination(disp, logits, self.convex_upsampler.factor)

    def refine(
        self, geo: GeometryEncoding, disp: Tensor, net: list[Tensor], inp: list[Tensor], att: list[Tensor],
        stem_2x: Tensor, iters: int, upsample_every: bool = True, keep_states: bool = False,
    ) -> tuple[list[Tensor], list[list[Tensor]], list[Tensor]]:
        """``iters`` GRU iterations from ``disp``: the full-resolution predictions (every iteration's, or the
        last one only), and with ``keep_states`` the hidden states and low-resolution disparity of each."""
        disp = disp.float()
        preds, states, lowres = [], [], []
        for itr in range(iters):
            disp, net, mask_feat = self.refine_step(geo, disp, net, inp, att)
            if keep_states:
                states.append(list(net))
                lowres.append(disp)
            if upsample_every or itr == iters - 1:
                preds.append(self.upsample(disp, mask_feat, stem_2x))
        return preds, states, lowres

    def run(self, image1: Tensor, image2: Tensor, iters: int, test_mode: bool = False,
            init_disp: Tensor | None = None, return_intermediates: bool = False):
        """The forward pass, composed of the stages; outputs as documented on the model's ``forward``."""
        image1, image2 = normalize_image(image1), normalize_image(image2)
        feats_l, feats_r, vit_feat, stem_2x = self.encode(image1, image2)
        fl, fr = feats_l[self.base], feats_r[self.base]
        cost_volume, vol = self.build_volume(fl, fr)
        vol = self.filter_volume(vol, feats_l[self.base :])
        logits, regressed = self.initial_disparity(vol)
        init_disp = regressed if init_disp is None else init_disp
        net, inp, att = self.context(feats_l, image1, vit_feat)
        preds, states, lowres = self.refine(
            self.geometry(fl, fr, vol), init_disp, net, inp, att, stem_2x, iters,
            upsample_every=return_intermediates or not test_mode, keep_states=return_intermediates,
        )
        disp = preds[-1] if preds else None
        if return_intermediates:
            return StereoOutput(
                disp=disp, init_disp=init_disp, disp_preds=preds, features_left=feats_l, features_right=feats_r,
                vit_feat=vit_feat, cost_volume=cost_volume, filtered_volume=vol, cost_logits=logits,
                hidden_states=states, disp_lowres=lowres, volume_scale=self.volume_scale,
            )
        if test_mode:
            return disp
        return init_disp, preds
