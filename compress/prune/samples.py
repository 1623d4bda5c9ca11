"""The calibration and distillation samples of a pruning run: centre-cropped stereo pairs, batched by index."""

from __future__ import annotations

from typing import Any

import torch

from compress.data.datasets import build_dataset
from compress.errors import DataError

from .config import PruneConfig


def _crop(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    h, w = t.shape[-2:]
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return t[..., top : top + size[0], left : left + size[1]]


def build_samples(cfg: PruneConfig) -> list[dict[str, Any]]:
    """The calibration / distillation samples: tensors cropped to multiples of 32 (see DataSpec)."""
    spec = cfg.data
    dataset = build_dataset(spec, seed=cfg.seed)
    if len(dataset) == 0:
        raise DataError(f"dataset {spec.path} holds no samples")
    return crop_samples(dataset, spec.num_samples, spec.size)


def crop_samples(dataset, num_samples: int, size: list[int] | tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """The first ``num_samples`` items of a stereo dataset, centre-cropped to ``size`` (default: each image
    rounded down to multiples of 32)."""
    samples = []
    for i in range(min(num_samples, len(dataset))):
        item = dataset[i]
        h, w = item["left"].shape[-2:]
        crop = tuple(size) if size else (h // 32 * 32, w // 32 * 32)
        if crop[0] < 32 or crop[1] < 32 or crop[0] > h or crop[1] > w:
            raise DataError(f"sample {item.get('name', i)} is {h}x{w}; it cannot be cropped to {crop[0]}x{crop[1]}")
        samples.append({k: _crop(v, crop) if k in ("left", "right", "disp", "valid", "nonocc") else v
                        for k, v in item.items()})
    return samples


def index_batches(samples: list[dict], batch_size: int, start: int, count: int) -> list[list[int]]:
    """``count`` batches of sample indices from batch ``start`` on, cycling through the samples."""
    order = [(start * batch_size + i) % len(samples) for i in range(count * batch_size)]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(samples: list[dict], idxs: list[int], device: torch.device) -> dict[str, Any]:
    """Samples ``idxs`` stacked into one batch on ``device``."""
    out = {}
    for key in ("left", "right", "disp", "valid", "has_gt"):
        if key in samples[idxs[0]]:
            out[key] = torch.stack([torch.as_tensor(samples[i][key]) for i in idxs]).to(device)
    return out
