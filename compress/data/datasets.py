"""Datasets from their recipe specs (a ``DatasetSpec``, the augmentation of a distill ``DataConfig``), and the resumable
sampler that makes the training data order a function of (seed, step) only."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset, DistributedSampler, Subset

from compress.data.augment import AugmentConfig, StereoAugmentor
from compress.data.readers import open_dataset
from compress.data.sample import Transform
from compress.data.spec import DatasetSpec
from compress.data.synthetic import SyntheticStereoDataset
from compress.errors import ConfigError


def build_dataset(spec: DatasetSpec, transform: Transform | None = None, seed: int = 0) -> Dataset:
    """The dataset a recipe's DatasetSpec describes, with ``transform`` on every sample."""
    if spec.kind == "synthetic" or (spec.kind == "auto" and not spec.path):
        n = spec.num_samples if spec.limit is None else min(spec.num_samples, spec.limit)
        return SyntheticStereoDataset(n, spec.synthetic, transform=transform, seed=seed)
    try:
        ds = open_dataset(spec.path, kind=spec.kind, transform=transform, seed=seed, **spec.options)
    except TypeError as exc:
        raise ConfigError(f"dataset options {dict(spec.options)} do not fit kind {spec.kind!r}: {exc}") from None
    if spec.limit is not None:
        if hasattr(ds, "records"):
            ds.records = ds.records[: spec.limit]
        else:
            return Subset(ds, range(min(spec.limit, len(ds))))
    return ds


def augmentor(d: Any) -> Transform | None:
    """The training augmentation a DataConfig asks for (None: none)."""
    if d.crop_size is None and d.scale_prob == 0 and d.vflip_prob == 0 and d.jitter_prob == 0:
        return None
    crop = None if d.crop_size is None else tuple(d.crop_size)
    return StereoAugmentor(AugmentConfig(crop_size=crop, scale_prob=d.scale_prob, vflip_prob=d.vflip_prob,
                                         jitter_prob=d.jitter_prob))


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way (at sample ``start`` of this rank's share)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` indices of this rank's share in the current epoch."""
        self.start = int(start)

    def __iter__(self):
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start
