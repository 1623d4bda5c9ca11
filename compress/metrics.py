"""Stereo accuracy metrics: end-point error, KITTI D1 and Middlebury bad-pixel rates.

All functions accept numpy arrays or torch tensors of identical shape (any layout: HxW, 1xHxW, Bx1xHxW).
Pixels count when the ground truth is finite, the `valid` mask (if given) is True and the `nonocc` mask (if
given) is True; Middlebury reports use nonocc, KITTI the full valid mask. A non-finite prediction counts as
an infinitely wrong pixel (it makes EPE infinite and counts as bad), never as a skipped one.
Bad-pixel rates and D1 are percentages; EPE is in pixels. With no counted pixel every metric is nan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from compress.errors import DataError

__all__ = [
    "METRIC_KEYS",
    "THRESHOLDS",
    "MetricAccumulator",
    "agreement",
    "bad_pixel",
    "compute_metrics",
    "d1",
    "epe",
]

THRESHOLDS = (0.5, 1.0, 2.0, 3.0)
METRIC_KEYS = ("epe", "d1") + tuple(f"bp{t:g}" for t in THRESHOLDS)
# KITTI D1: a pixel is an outlier when its error exceeds both 3 px and 5 % of the true disparity.
D1_ABS, D1_REL = 3.0, 0.05

ArrayLike = Any  # np.ndarray | torch.Tensor


def _to_numpy(x: ArrayLike, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64 if x.is_floating_point() else x.dtype).numpy()
    if isinstance(x, np.ndarray):
        return x
    raise DataError(f"{what} must be a numpy array or torch tensor, got {type(x).__name__}.")


def _mask(x: ArrayLike | None, what: str, shape: tuple[int, ...]) -> np.ndarray | None:
    if x is None:
        return None
    m = _to_numpy(x, what)
    if m.shape != shape:
        raise DataError(f"{what} mask has shape {m.shape} but the ground truth has shape {shape}; they must match.")
    return m.astype(bool) if m.dtype == bool else m != 0


def _errors(
    pred: ArrayLike, gt: ArrayLike, valid: ArrayLike | None, nonocc: ArrayLike | None
) -> tuple[np.ndarray, np.ndarray]:
    """Absolute errors and ground-truth values of the counted pixels, as flat float64 arrays."""
    p = _to_numpy(pred, "prediction")
    g = _to_numpy(gt, "ground truth")
    if p.shape != g.shape:
        raise DataError(
            f"prediction has shape {tuple(p.shape)} but ground truth has shape {tuple(g.shape)}; "
            "resize or crop the prediction to the ground truth first."
        )
    g = g.astype(np.float64, copy=False)
    p = p.astype(np.float64, copy=False)
    mask = np.isfinite(g)
    for m in (_mask(valid, "valid", g.shape), _mask(nonocc, "nonocc", g.shape)):
        if m is not None:
            mask &= m
    gv, pv = g[mask], p[mask]
    err = np.where(np.isfinite(pv), np.abs(pv - gv), np.inf)
    return err, gv


@dataclass
class _Counts:
    """Sufficient statistics of a set of pixels: sums and outlier counts combine by addition."""

    n: int = 0
    err_sum: float = 0.0
    d1: int = 0
    bad: dict[float, int] = field(default_factory=lambda: dict.fromkeys(THRESHOLDS, 0))

    @classmethod
    def of(cls, err: np.ndarray, gt: np.ndarray) -> _Counts:
        return cls(
            n=int(err.size),
            err_sum=float(err.sum()),
            d1=int(np.count_nonzero((err > D1_ABS) & (err > D1_REL * np.abs(gt)))),
            bad={t: int(np.count_nonzero(err > t)) for t in THRESHOLDS},
        )

    def add(self, other: _Counts) -> None:
        self.n += other.n
        self.err_sum += other.err_sum
        self.d1 += other.d1
        for t in THRESHOLDS:
            self.bad[t] += other.bad[t]

    def metrics(self) -> dict[str, float]:
        if self.n == 0:
            return dict.fromkeys(METRIC_KEYS, float("nan"))
        out = {"epe": self.err_sum / self.n, "d1": 100.0 * self.d1 / self.n}
        out.update({f"bp{t:g}": 100.0 * self.bad[t] / self.n for t in THRESHOLDS})
        return out


def epe(pred: ArrayLike, gt: ArrayLike, valid: ArrayLike | None = None, nonocc: ArrayLike | None = None) -> float:
    """Mean absolute disparity error (pixels) over the counted pixels."""
    err, _ = _errors(pred, gt, valid, nonocc)
    return float(err.mean()) if err.size else float("nan")


def d1(pred: ArrayLike, gt: ArrayLike, valid: ArrayLike | None = None, nonocc: ArrayLike | None = None) -> float:
    """KITTI D1 (%): share of pixels with error > 3 px and > 5 % of the true disparity."""
    err, g = _errors(pred, gt, valid, nonocc)
    if not err.size:
        return float("nan")
    return 100.0 * np.count_nonzero((err > D1_ABS) & (err > D1_REL * np.abs(g))) / err.size


def bad_pixel(
    pred: ArrayLike, gt: ArrayLike, thr: float, valid: ArrayLike | None = None, nonocc: ArrayLike | None = None
) -> float:
    """Middlebury bad-`thr` (%): share of pixels with error strictly above `thr` pixels."""
    err, _ = _errors(pred, gt, valid, nonocc)
    return 100.0 * np.count_nonzero(err > thr) / err.size if err.size else float("nan")


def compute_metrics(
    pred: ArrayLike, gt: ArrayLike, valid: ArrayLike | None = None, nonocc: ArrayLike | None = None
) -> dict[str, float]:
    """All metrics at once: epe (px), d1, bp0.5, bp1, bp2, bp3 (%); a batch counts as one pixel pool."""
    return _Counts.of(*_errors(pred, gt, valid, nonocc)).metrics()


def agreement(student: ArrayLike, teacher: ArrayLike, valid: ArrayLike | None = None) -> dict[str, float]:
    """compute_metrics with the teacher's prediction as the reference, over every pixel where it is finite."""
    return compute_metrics(student, teacher, valid)


class MetricAccumulator:
    """Aggregates metrics over a dataset image by image.

    compute() pools all pixels (each pixel weighs the same: the dataset-level number); per_image_mean()
    averages the per-image metrics (each image weighs the same). Images without counted pixels are kept in
    `per_image` (as nan) but left out of per_image_mean().
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self._total = _Counts()
        self.per_image: list[dict[str, float]] = []
        self.names: list[str] = []

    def update(
        self,
        pred: ArrayLike,
        gt: ArrayLike,
        valid: ArrayLike | None = None,
        nonocc: ArrayLike | None = None,
        names: list[str] | str | None = None,
    ) -> list[dict[str, float]]:
        """Add one image, or a batch when the inputs are 4-D (B x 1 x H x W); returns each image's metrics."""
        p = _to_numpy(pred, "prediction")
        batched = p.ndim == 4
        if not batched:
            items = [(pred, gt, valid, nonocc)]
        else:
            g = _to_numpy(gt, "ground truth")
            if g.shape != p.shape:
                raise DataError(f"prediction has shape {p.shape} but ground truth has shape {g.shape}.")
            v = _mask(valid, "valid", g.shape)
            o = _mask(nonocc, "nonocc", g.shape)
            items = [(p[i], g[i], None if v is None else v[i], None if o is None else o[i]) for i in range(len(p))]
        if isinstance(names, str):
            names = [names]
        if names is not None and len(names) != len(items):
            raise DataError(f"got {len(names)} names for {len(items)} images.")
        results = []
        for k, (pi, gi, vi, oi) in enumerate(items):
            counts = _Counts.of(*_errors(pi, gi, vi, oi))
            self._total.add(counts)
            result = counts.metrics()
            self.per_image.append(result)
            self.names.append(names[k] if names is not None else str(len(self.names)))
            results.append(result)
        return results

    @property
    def num_images(self) -> int:
        """Images added so far."""
        return len(self.per_image)

    @property
    def num_pixels(self) -> int:
        """Pixels counted so far (over all images)."""
        return self._total.n

    def compute(self) -> dict[str, float]:
        """Pixel-weighted metrics over everything added (the standard dataset-level numbers)."""
        return self._total.metrics()

    def per_image_mean(self) -> dict[str, float]:
        """Mean over images of each image's metrics (images with no counted pixel are skipped)."""
        scored = [m for m in self.per_image if not np.isnan(m["epe"])]
        if not scored:
            return dict.fromkeys(METRIC_KEYS, float("nan"))
        return {k: float(np.mean([m[k] for m in scored])) for k in METRIC_KEYS}

    def summary(self) -> dict[str, float]:
        """compute() plus '<key>_image_mean' entries, num_images and num_pixels, for reports."""
        out: dict[str, float] = dict(self.compute())
        out.update({f"{k}_image_mean": v for k, v in self.per_image_mean().items()})
        out["num_images"] = float(self.num_images)
        out["num_pixels"] = float(self.num_pixels)
        return out
