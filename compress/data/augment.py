"""Training augmentation for stereo samples: random scale, random crop and colour jitter.

Geometry is always applied identically to both views and to the ground truth, so a pixel and its match stay
aligned. There is deliberately no horizontal flip: mirroring both images turns the left camera into a
right-hand one (matches would move the wrong way), and a valid flip must also swap the views, which then
needs ground truth for the right view that most datasets do not provide. A vertical flip keeps epipolar
lines horizontal and disparities unchanged, so it is offered (off by default).

All randomness comes from the np.random.Generator passed in (StereoDataset derives one per item).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from compress.data.sample import StereoSample
from compress.errors import ConfigError, DataError

__all__ = [
    "AugmentConfig",
    "StereoAugmentor",
    "augment",
    "colour_jitter",
    "crop_sample",
    "random_crop",
    "random_scale",
    "scale_sample",
    "vflip_sample",
]

_LUMA = np.array([0.299, 0.587, 0.114])
# RGB <-> YIQ: rotating the (I, Q) chroma plane shifts hue while keeping luma.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


@dataclass
class AugmentConfig:
    """Augmentation settings; probabilities are per sample."""

    crop_size: tuple[int, int] | None = None
    """(height, width) of the random crop; both must be multiples of 32 (the model's stride). None = no crop."""
    scale_prob: float = 0.0
    """Probability of resizing the pair (disparity values scale by the same factor) before cropping."""
    scale_range: tuple[float, float] = (0.8, 1.25)
    """Log-uniform range of the resize factor (raised where needed so the crop still fits)."""
    jitter_prob: float = 1.0
    """Probability of applying colour jitter at all."""
    asymmetric_prob: float = 0.2
    """Given jitter, probability that the right view gets independently drawn jitter (camera mismatch)."""
    brightness: float = 0.3
    """Brightness factor drawn from [1 - brightness, 1 + brightness]."""
    contrast: float = 0.3
    """Contrast factor drawn from [1 - contrast, 1 + contrast]."""
    saturation: float = 0.3
    """Saturation factor drawn from [1 - saturation, 1 + saturation]."""
    hue: float = 0.05
    """Hue rotation drawn from [-hue, hue] turns (YIQ chroma rotation)."""
    gamma: tuple[float, float] = (0.8, 1.2)
    """Gamma exponent range applied to 0..1 intensities."""
    vflip_prob: float = 0.0
    """Probability of flipping both views and the ground truth upside down (valid for rectified pairs)."""

    def __post_init__(self) -> None:
        if self.crop_size is not None:
            self.crop_size = (int(self.crop_size[0]), int(self.crop_size[1]))
            if any(s <= 0 or s % 32 for s in self.crop_size):
                raise ConfigError(
                    f"crop_size={self.crop_size} must be positive multiples of 32 (the stereo models' stride)."
                )
        self.scale_range = (float(self.scale_range[0]), float(self.scale_range[1]))
        self.gamma = (float(self.gamma[0]), float(self.gamma[1]))
        for key in ("scale_prob", "jitter_prob", "asymmetric_prob", "vflip_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{key}={getattr(self, key)} must be a probability in [0, 1].")
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ConfigError(f"scale_range={self.scale_range} must satisfy 0 < low <= high.")
        for key in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{key}={getattr(self, key)} must be in [0, 1).")
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError(f"hue={self.hue} must be in [0, 0.5] turns.")
        if not 0 < self.gamma[0] <= self.gamma[1]:
            raise ConfigError(f"gamma={self.gamma} must satisfy 0 < low <= high.")


# ------------------------------------------------------------------------------------------------ geometry


def crop_sample(sample: StereoSample, top: int, left: int, height: int, width: int) -> StereoSample:
    """Crop both views and the ground truth to the same window.

    A nonocc pixel whose match (x - d) falls left of the window is no longer visible in the cropped right
    view, so it leaves the nonocc mask (its disparity stays valid ground truth).
    """
    if top < 0 or left < 0 or top + height > sample.height or left + width > sample.width:
        raise DataError(
            f"sample {sample.name!r}: crop {height}x{width} (height x width) at (top {top}, left {left}) does not fit "
            f"the {sample.height}x{sample.width} image."
        )
    win = (slice(top, top + height), slice(left, left + width))
    disp = None if sample.disp is None else sample.disp[win].copy()
    valid = None if sample.valid is None else sample.valid[win].copy()
    nonocc = None
    if sample.nonocc is not None:
        nonocc = sample.nonocc[win].copy()
        if disp is not None:
            xs = np.arange(width, dtype=np.float32)[None, :]
            with np.errstate(invalid="ignore"):
                nonocc &= np.isfinite(disp) & (xs - disp >= 0)
    return replace(
        sample,
        left=np.ascontiguousarray(sample.left[win]),
        right=np.ascontiguousarray(sample.right[win]),
        disp=disp,
        valid=valid,
        nonocc=nonocc,
    )


def vflip_sample(sample: StereoSample) -> StereoSample:
    """Flip both views and the ground truth upside down (rows only, so matches stay on the same row)."""

    def flip(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.ascontiguousarray(a[::-1])

    return replace(
        sample,
        left=flip(sample.left),
        right=flip(sample.right),
        disp=flip(sample.disp),
        valid=flip(sample.valid),
        nonocc=flip(sample.nonocc),
    )


def random_crop(sample: StereoSample, size: tuple[int, int], rng: np.random.Generator) -> StereoSample:
    """Crop a uniformly placed (height, width) window; DataError if the sample is smaller."""
    h, w = size
    if sample.height < h or sample.width < w:
        raise DataError(
            f"sample {sample.name!r} is {sample.height}x{sample.width} (height x width), smaller than the crop "
            f"{h}x{w}; use a smaller crop_size or enable scaling (scale_prob > 0) to enlarge small images."
        )
    top = int(rng.integers(0, sample.height - h + 1))
    left = int(rng.integers(0, sample.width - w + 1))
    return crop_sample(sample, top, left, h, w)


def resize_image(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a uint8 HxWx3 image (antialiased when shrinking)."""
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
    shrinking = height < img.shape[0] or width < img.shape[1]
    out = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False, antialias=shrinking)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _nearest_index(n_out: int, n_in: int) -> np.ndarray:
    # Pixel-centre aligned nearest neighbour: output centre (i + 0.5) * n_in / n_out.
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def scale_sample(sample: StereoSample, height: int, width: int) -> StereoSample:
    """Resize a sample to height x width; disparity values are multiplied by the horizontal factor.

    Views are resampled bilinearly (antialiased when shrinking). Ground truth is resampled by nearest
    neighbour so that sparse ground truth (KITTI) and invalid markers are never blended with valid values.
    """
    if height <= 0 or width <= 0:
        raise DataError(f"sample {sample.name!r}: cannot resize to {height}x{width} (height x width).")
    iy = _nearest_index(height, sample.height)[:, None]
    ix = _nearest_index(width, sample.width)[None, :]
    factor = width / sample.width
    disp = None if sample.disp is None else (sample.disp[iy, ix] * np.float32(factor)).astype(np.float32)
    return replace(
        sample,
        left=resize_image(sample.left, height, width),
        right=resize_image(sample.right, height, width),
        disp=disp,
        valid=None if sample.valid is None else sample.valid[iy, ix],
        nonocc=None if sample.nonocc is None else sample.nonocc[iy, ix],
    )


def random_scale(
    sample: StereoSample,
    scale_range: tuple[float, float],
    rng: np.random.Generator,
    min_size: tuple[int, int] | None = None,
) -> StereoSample:
    """Resize by a log-uniform factor from scale_range, never below what min_size (h, w) needs."""
    lo, hi = scale_range
    if min_size is not None:
        need = max(min_size[0] / sample.height, min_size[1] / sample.width)
        lo, hi = max(lo, need), max(hi, need)
    s = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    h = max(round(sample.height * s), min_size[0] if min_size else 1)
    w = max(round(sample.width * s), min_size[1] if min_size else 1)
    return scale_sample(sample, h, w)


# -------------------------------------------------------------------------------------------------- colour


@dataclass(frozen=True)
class _Jitter:
    brightness: float
    contrast: float
    saturation: float
    hue: float
    gamma: float


def _draw_jitter(cfg: AugmentConfig, rng: np.random.Generator) -> _Jitter:
    return _Jitter(
        brightness=rng.uniform(1 - cfg.brightness, 1 + cfg.brightness),
        contrast=rng.uniform(1 - cfg.contrast, 1 + cfg.contrast),
        saturation=rng.uniform(1 - cfg.saturation, 1 + cfg.saturation),
        hue=rng.uniform(-cfg.hue, cfg.hue),
        gamma=math.exp(rng.uniform(math.log(cfg.gamma[0]), math.log(cfg.gamma[1]))),
    )


def _apply_jitter(img: np.ndarray, j: _Jitter, mean_luma: float) -> np.ndarray:
    """Apply one jitter draw; mean_luma is the contrast pivot (shared between views in symmetric mode)."""
    x = img.astype(np.float64) / 255.0 * j.brightness
    x = (x - mean_luma * j.brightness) * j.contrast + mean_luma * j.brightness
    luma = (x @ _LUMA)[..., None]
    x = luma + (x - luma) * j.saturation
    if j.hue != 0.0:
        a = 2 * math.pi * j.hue
        rot = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
        x = x @ (_YIQ_TO_RGB @ rot @ _RGB_TO_YIQ).T
    x = np.clip(x, 0.0, 1.0) ** j.gamma
    return np.rint(x * 255.0).astype(np.uint8)


def _mean_luma(*images: np.ndarray) -> float:
    return float(np.mean([(img.reshape(-1, 3) @ _LUMA).mean() for img in images]) / 255.0)


def colour_jitter(sample: StereoSample, cfg: AugmentConfig, rng: np.random.Generator) -> StereoSample:
    """Brightness, contrast, saturation, hue and gamma jitter; the same draw for both views unless the
    asymmetric branch (probability cfg.asymmetric_prob) draws the right view's separately.

    In the symmetric case both views also share the contrast pivot, so the jitter is one per-pixel function
    of colour: pixels that were equal across views stay equal.
    """
    asymmetric = rng.random() < cfg.asymmetric_prob
    jl = _draw_jitter(cfg, rng)
    if asymmetric:
        jr = _draw_jitter(cfg, rng)
        left = _apply_jitter(sample.left, jl, _mean_luma(sample.left))
        right = _apply_jitter(sample.right, jr, _mean_luma(sample.right))
    else:
        pivot = _mean_luma(sample.left, sample.right)
        left = _apply_jitter(sample.left, jl, pivot)
        right = _apply_jitter(sample.right, jl, pivot)
    return replace(sample, left=left, right=right)


# -------------------------------------------------------------------------------------------------- driver


def augment(sample: StereoSample, cfg: AugmentConfig, rng: np.random.Generator) -> StereoSample:
    """Random scale (if drawn), random crop (if configured), vertical flip (if drawn), colour jitter (if drawn)."""
    if cfg.scale_prob > 0 and rng.random() < cfg.scale_prob:
        sample = random_scale(sample, cfg.scale_range, rng, min_size=cfg.crop_size)
    if cfg.crop_size is not None:
        sample = random_crop(sample, cfg.crop_size, rng)
    if cfg.vflip_prob > 0 and rng.random() < cfg.vflip_prob:
        sample = vflip_sample(sample)
    if cfg.jitter_prob > 0 and rng.random() < cfg.jitter_prob:
        sample = colour_jitter(sample, cfg, rng)
    return sample


class StereoAugmentor:
    """Callable transform for StereoDataset: `dataset = open_dataset(path, transform=StereoAugmentor(cfg))`."""

    def __init__(self, config: AugmentConfig) -> None:
        self.config = config

    def __call__(self, sample: StereoSample, rng: np.random.Generator) -> StereoSample:
        return augment(sample, self.config, rng)

    def __repr__(self) -> str:
        return f"StereoAugmentor({self.config!r})"
