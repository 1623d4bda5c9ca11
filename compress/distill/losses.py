"""Distillation losses: feature pyramids, cost-volume disparity distributions, and disparity outputs.

Every loss reads what it needs from a student :class:`~teacher.outputs.StereoOutput` and from
:class:`TeacherTargets` (built from a live teacher's StereoOutput or from cached pseudo-labels), so nothing
here assumes the student is a FoundationStereo: widths, resolutions and disparity counts come from tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import ConfigError
from teacher.outputs import StereoOutput

from .config import CostVolumeLossConfig, FeatureLossConfig, LossConfig, OutputLossConfig

__all__ = [
    "LOSS_NAMES",
    "DistillLoss",
    "FeatureAdapters",
    "GroundTruth",
    "TeacherTargets",
    "cost_volume_loss",
    "feature_loss",
    "output_loss",
    "rebin_disparity",
    "resample_distribution",
    "temper",
]

LOSS_NAMES = ("feature", "cost_volume", "output_teacher", "output_gt", "init")


def _stride(image_hw: tuple[int, int], feat: torch.Tensor) -> int | None:
    """Image-to-feature resolution ratio when it is a whole number, the same along both axes."""
    h, w = image_hw
    fh, fw = feat.shape[-2:]
    if fh == 0 or fw == 0 or h % fh or w % fw or h // fh != w // fw:
        return None
    return h // fh


@dataclass
class TeacherTargets:
    """What the losses compare the student with, teacher side (tensors may be on any device).

    ``prob`` is the teacher's disparity distribution at temperature 1 (B x D x h x w, summing to 1 over D);
    ``prob_scale`` is the image-to-volume ratio in which its disparity levels are counted (level d means
    d * prob_scale image pixels), independent of the spatial size of ``prob`` (which may be pooled).
    ``features`` maps stride (image / feature resolution) to the teacher's left feature at that stride.
    """

    disp: torch.Tensor
    prob: torch.Tensor | None = None
    prob_scale: int = 4
    features: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_output(cls, out: StereoOutput, feature_levels: list[int] | None = None) -> TeacherTargets:
        """Targets of a live teacher forward (detached); ``feature_levels`` None keeps every level."""
        image_hw = tuple(out.disp.shape[-2:])
        feats: dict[int, torch.Tensor] = {}
        levels = range(len(out.features_left)) if feature_levels is None else feature_levels
        for level in levels:
            if level >= len(out.features_left):
                raise ConfigError(
                    f"teacher feature level {level} requested but the teacher has {len(out.features_left)} levels"
                )
            f = out.features_left[level]
            stride = _stride(image_hw, f)
            if stride is not None and stride not in feats:
                feats[stride] = f.detach()
        prob = None
        if out.cost_logits is not None:
            prob = torch.softmax(out.cost_logits.detach().float(), dim=1)
        return cls(disp=out.disp.detach().float(), prob=prob, prob_scale=int(out.volume_scale), features=feats)

    @classmethod
    def from_batch(cls, batch: dict[str, Any]) -> TeacherTargets:
        """Targets of a LabelledDataset batch (keys teacher_disp, teacher_prob, teacher_prob_scale, teacher_feat)."""
        if "teacher_disp" not in batch:
            raise ConfigError("the batch holds no teacher labels (expected a LabelledDataset batch)")
        scale = batch.get("teacher_prob_scale")
        if isinstance(scale, torch.Tensor):
            scale = int(scale.reshape(-1)[0])
        feats = {int(k): v for k, v in batch.get("teacher_feat", {}).items()}
        return cls(
            disp=batch["teacher_disp"].float(),
            prob=batch.get("teacher_prob"),
            prob_scale=int(scale) if scale is not None else 4,
            features=feats,
        )

    def to(self, device: torch.device | str) -> TeacherTargets:
        """The same targets on another device (non-blocking copies)."""
        return TeacherTargets(
            disp=self.disp.to(device, non_blocking=True),
            prob=None if self.prob is None else self.prob.to(device, non_blocking=True),
            prob_scale=self.prob_scale,
            features={k: v.to(device, non_blocking=True) for k, v in self.features.items()},
        )


@dataclass
class GroundTruth:
    """Ground truth of a batch: disparity B x 1 x H x W, valid mask, and which samples have any."""

    disp: torch.Tensor
    valid: torch.Tensor
    has_gt: torch.Tensor

    @classmethod
    def from_batch(cls, batch: dict[str, Any]) -> GroundTruth | None:
        """From a sample_to_tensors batch; None when no sample has ground truth."""
        if "disp" not in batch or "has_gt" not in batch:
            return None
        has_gt = torch.as_tensor(batch["has_gt"]).reshape(-1).bool()
        if not bool(has_gt.any()):
            return None
        return cls(disp=batch["disp"].float(), valid=batch["valid"].bool(), has_gt=has_gt)

    def to(self, device: torch.device | str) -> GroundTruth:
        """The same ground truth on another device."""
        return GroundTruth(self.disp.to(device), self.valid.to(device), self.has_gt.to(device))


# --------------------------------------------------------------------------------------------- features


class FeatureAdapters(nn.Module):
    """Learned 1x1 projections from student feature widths to teacher widths, one per matched stride.

    Student features are projected (never the teacher's: a learned teacher-side projection could shrink
    the target to zero). Where widths already agree the adapter is the identity. Build it with
    :meth:`discover` from one dry forward of each model.
    """

    def __init__(self, pairs: list[tuple[int, int, int, int]]) -> None:
        """``pairs``: (stride, student level index, student channels, teacher channels)."""
        super().__init__()
        self.pairs = [tuple(int(v) for v in p) for p in pairs]
        self.proj = nn.ModuleDict()
        for stride, _, cs, ct in self.pairs:
            self.proj[str(stride)] = nn.Identity() if cs == ct else nn.Conv2d(cs, ct, kernel_size=1)

    @classmethod
    def discover(
        cls,
        student: StereoOutput,
        teacher_features: dict[int, torch.Tensor] | dict[int, int],
    ) -> FeatureAdapters:
        """Match student pyramid levels with teacher features of the same stride.

        ``teacher_features`` maps stride to a teacher feature tensor (or directly to its channel count). The
        student may have fewer levels, or levels the teacher lacks; unmatched ones are ignored.
        """
        image_hw = tuple(student.disp.shape[-2:])
        widths = {
            s: (t if isinstance(t, int) else int(t.shape[1])) for s, t in teacher_features.items()
        }
        pairs, seen = [], set()
        for idx, feat in enumerate(student.features_left):
            stride = _stride(image_hw, feat)
            if stride is None or stride in seen or stride not in widths:
                continue
            seen.add(stride)
            pairs.append((stride, idx, int(feat.shape[1]), widths[stride]))
        return cls(pairs)

    def forward(self, student_features: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        """Projected student features keyed by stride."""
        out = {}
        for stride, idx, _, _ in self.pairs:
            if idx >= len(student_features):
                raise ConfigError(
                    f"the student returned {len(student_features)} feature levels but the adapters were built "
                    f"for level {idx}; rebuild FeatureAdapters for this student"
                )
            out[stride] = self.proj[str(stride)](student_features[idx])
        return out


def _standardise(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + 1e-5)


def feature_loss(
    student: StereoOutput,
    teacher: TeacherTargets,
    adapters: FeatureAdapters,
    cfg: FeatureLossConfig | None = None,
) -> torch.Tensor:
    """Mean over matched strides of the MSE between projected student and (detached) teacher features."""
    cfg = cfg or FeatureLossConfig()
    projected = adapters(student.features_left)
    terms = []
    for stride, s_feat in projected.items():
        t_feat = teacher.features.get(stride)
        if t_feat is None:
            continue
        s = s_feat.float()
        t = t_feat.detach().float()
        if s.shape != t.shape:
            raise ConfigError(
                f"feature stride {stride}: student {tuple(s.shape)} vs teacher {tuple(t.shape)} after projection"
            )
        if cfg.normalize:
            s, t = _standardise(s), _standardise(t)
        terms.append(F.mse_loss(s, t))
    if not terms:
        return student.disp.new_zeros(())
    return torch.stack(terms).mean()


# ----------------------------------------------------------------------------------------- cost volume


def rebin_disparity(prob: torch.Tensor, scale_from: int, scale_to: int, num_to: int) -> torch.Tensor:
    """Move a distribution over D_from disparity levels (units of ``scale_from`` image px) to ``num_to`` levels
    in units of ``scale_to`` px.

    Level d sits at x = d * scale_from / scale_to target levels; its mass is split linearly between
    floor(x) and floor(x) + 1, which keeps the expected disparity exactly. Mass beyond the last target level
    is put on the last level (the target cannot represent it).
    """
    d_from = prob.shape[1]
    if scale_from == scale_to and d_from == num_to:
        return prob
    x = torch.arange(d_from, dtype=torch.float64) * (scale_from / scale_to)
    lo = torch.floor(x).long()
    frac = x - lo
    weights = torch.zeros(d_from, num_to, dtype=torch.float64)
    rows = torch.arange(d_from)
    inside = lo < num_to - 1
    weights[rows[inside], lo[inside]] = 1 - frac[inside]
    weights[rows[inside], lo[inside] + 1] = frac[inside]
    weights[rows[~inside], num_to - 1] = 1.0
    weights = weights.to(device=prob.device, dtype=prob.dtype)
    return torch.einsum("bdhw,de->behw", prob, weights)


def resample_distribution(
    prob: torch.Tensor, size: tuple[int, int], scale_from: int, scale_to: int, num_to: int
) -> torch.Tensor:
    """Bring a teacher distribution to the student's volume: spatial size ``size`` and ``num_to`` levels.

    Spatially, finer axes are area-pooled and coarser ones bilinearly interpolated; both are convex
    combinations of pixels, so each pixel still sums to 1. The disparity axis is re-binned
    (:func:`rebin_disparity`).
    """
    prob = prob.float()
    rebin_first = num_to <= prob.shape[1]  # do the cheaper resampling on the smaller tensor
    if rebin_first:
        prob = rebin_disparity(prob, scale_from, scale_to, num_to)
    h, w = prob.shape[-2:]
    th, tw = size
    if (h, w) != (th, tw):
        mid = (min(h, th), min(w, tw))
        if mid != (h, w):
            prob = F.adaptive_avg_pool2d(prob, mid)
        if mid != (th, tw):
            prob = F.interpolate(prob, size=(th, tw), mode="bilinear", align_corners=False)
    if not rebin_first:
        prob = rebin_disparity(prob, scale_from, scale_to, num_to)
    return prob


def temper(prob: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(log(prob) / T): the distribution a temperature-T softmax of the same logits would give."""
    if temperature == 1.0:
        return prob
    p = prob.clamp_min(0) ** (1.0 / temperature)
    return p / p.sum(dim=1, keepdim=True).clamp_min(1e-12)


def cost_volume_loss(
    student: StereoOutput, teacher: TeacherTargets, cfg: CostVolumeLossConfig | None = None
) -> torch.Tensor:
    """T^2 * KL(teacher || student) of the tempered disparity distributions, averaged over volume pixels."""
    cfg = cfg or CostVolumeLossConfig()
    if student.cost_logits is None or teacher.prob is None:
        return student.disp.new_zeros(())
    logits = student.cost_logits.float()
    b, d_s, h_s, w_s = logits.shape
    target = resample_distribution(teacher.prob.detach(), (h_s, w_s), teacher.prob_scale, student.volume_scale, d_s)
    target = temper(target, cfg.temperature)
    log_q = F.log_softmax(logits / cfg.temperature, dim=1)
    kl = torch.xlogy(target, target) - target * log_q
    return kl.sum(dim=1).mean() * cfg.temperature**2


# ------------------------------------------------------------------------------------------------ output


def _masked_smooth_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    per_pixel = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    count = mask.sum()
    return (per_pixel * mask).sum() / count.clamp_min(1)


def output_loss(
    student: StereoOutput,
    teacher: TeacherTargets,
    gt: GroundTruth | None = None,
    cfg: OutputLossConfig | None = None,
) -> dict[str, torch.Tensor]:
    """Sequence losses {'output_teacher', 'output_gt', 'init'}, each multiplied by its weight from ``cfg``.

    Prediction k of K weighs gamma ** (K - k). The initial disparity (volume resolution, volume pixels) is
    upsampled to full resolution and scaled to image pixels, then compared with the same targets, mixed in
    the ratio weight : gt_weight.
    """
    cfg = cfg or OutputLossConfig()
    preds = list(student.disp_preds) or [student.disp]
    t_disp = teacher.disp.detach().float()
    if preds[-1].shape[-2:] != t_disp.shape[-2:]:
        raise ConfigError(
            f"student disparity is {tuple(preds[-1].shape[-2:])} but the teacher's is {tuple(t_disp.shape[-2:])}"
        )
    t_mask = torch.isfinite(t_disp)
    if cfg.max_disp is not None:
        t_mask &= t_disp < cfg.max_disp
    t_mask = t_mask.float()
    t_disp = torch.where(t_mask.bool(), t_disp, torch.zeros_like(t_disp))

    g_mask = None
    if gt is not None and cfg.gt_weight > 0:
        g_mask = gt.valid.bool() & gt.has_gt.view(-1, 1, 1, 1)
        if cfg.max_disp is not None:
            g_mask &= gt.disp < cfg.max_disp
        g_mask = g_mask.float()
        g_disp = gt.disp.float()

    def per_prediction(pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pred = pred.float()
        lt = _masked_smooth_l1(pred, t_disp, t_mask, cfg.beta) if cfg.weight > 0 else pred.new_zeros(())
        lg = pred.new_zeros(())
        if g_mask is not None:
            lg = _masked_smooth_l1(pred, g_disp, g_mask, cfg.beta)
        return lt, lg

    k_total = len(preds)
    seq_t = preds[-1].new_zeros(())
    seq_g = preds[-1].new_zeros(())
    for k, pred in enumerate(preds, start=1):
        w = cfg.gamma ** (k_total - k)
        lt, lg = per_prediction(pred)
        seq_t = seq_t + w * lt
        seq_g = seq_g + w * lg

    init = preds[-1].new_zeros(())
    if cfg.init_weight > 0 and student.init_disp is not None:
        h, w_img = preds[-1].shape[-2:]
        ratio = w_img / student.init_disp.shape[-1]
        init_up = F.interpolate(student.init_disp.float(), size=(h, w_img), mode="bilinear", align_corners=False)
        lt, lg = per_prediction(init_up * ratio)
        # The same mix of targets as the sequence, normalised so init_weight alone sets the term's scale.
        w_t, w_g = cfg.weight, (cfg.gt_weight if g_mask is not None else 0.0)
        if w_t + w_g > 0:
            init = cfg.init_weight * (w_t * lt + w_g * lg) / (w_t + w_g)
    return {"output_teacher": cfg.weight * seq_t, "output_gt": cfg.gt_weight * seq_g, "init": init}


# -------------------------------------------------------------------------------------------- combined


class DistillLoss(nn.Module):
    """All distillation losses with their weights; ``forward`` returns (total, {name: detached scalar}).

    The names are :data:`LOSS_NAMES`; disabled losses are absent from the dict. It owns the feature
    adapters, so its parameters must be optimised together with the student's.
    """

    def __init__(self, cfg: LossConfig | None = None, adapters: FeatureAdapters | None = None) -> None:
        super().__init__()
        self.cfg = cfg or LossConfig()
        self.adapters = adapters if adapters is not None else FeatureAdapters([])

    def forward(
        self, student: StereoOutput, teacher: TeacherTargets, gt: GroundTruth | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted total loss and its named parts (weighted, detached)."""
        cfg = self.cfg
        parts: dict[str, torch.Tensor] = {}
        if cfg.feature.enabled:
            parts["feature"] = cfg.feature.weight * feature_loss(student, teacher, self.adapters, cfg.feature)
        if cfg.cost_volume.enabled:
            parts["cost_volume"] = cfg.cost_volume.weight * cost_volume_loss(student, teacher, cfg.cost_volume)
        if cfg.output.enabled:
            parts.update(output_loss(student, teacher, gt, cfg.output))
        if not parts:
            raise ConfigError("every distillation loss is disabled; enable at least one under loss.*")
        total = torch.stack(list(parts.values())).sum()
        return total, {k: v.detach() for k, v in parts.items()}
