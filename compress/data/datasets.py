"""Datasets from their recipe specs (training: augmented, or paired with cached teacher labels; evaluation), and
the resumable sampler that makes the training data order a function of (seed, step) only."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch.utils.data import Dataset, DistributedSampler, Subset

from compress.data.augment import AugmentConfig, StereoAugmentor
from compress.data.readers import Transform, open_dataset
from compress.data.synthetic import SyntheticConfig, SyntheticStereoDataset
from compress.errors import ConfigError

if TYPE_CHECKING:  # the recipe schema imports nothing from here; a runtime import would be circular
    from compress.distill.config import DataConfig, DatasetSpec
    from compress.distill.label_cache import LabelCache


def build_dataset(spec: DatasetSpec, transform: Transform | None = None, seed: int = 0) -> Dataset:
    """The dataset a DatasetSpec describes, with ``transform`` applied to every sample."""
    if spec.kind == "synthetic":
        s = spec.synthetic
        n = spec.num_samples if spec.limit is None else min(spec.num_samples, spec.limit)
        cfg = SyntheticConfig(
            height=s.height, width=s.width, max_disp=s.max_disp, num_objects=s.num_objects, seed=s.seed
        )
        return SyntheticStereoDataset(n, cfg, transform=transform, seed=seed)
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


def augmentor(d: DataConfig) -> Transform | None:
    """The training augmentation a DataConfig asks for (None: none)."""
    if d.crop_size is None and d.scale_prob == 0 and d.vflip_prob == 0 and d.jitter_prob == 0:
        return None
    crop = None if d.crop_size is None else tuple(d.crop_size)
    return StereoAugmentor(AugmentConfig(crop_size=crop, scale_prob=d.scale_prob, vflip_prob=d.vflip_prob,
                                         jitter_prob=d.jitter_prob))


def training_set(d: DataConfig, cache: LabelCache | None, seed: int) -> Dataset:
    """The training set: paired with the cache's teacher labels (cropped and jittered alike), or augmented."""
    if cache is not None:
        from compress.distill.label_cache import LabelledDataset

        return LabelledDataset(build_dataset(d.train, seed=seed), cache, crop_size=d.crop_size,
                               jitter_prob=d.jitter_prob, seed=seed)
    return build_dataset(d.train, transform=augmentor(d), seed=seed)


def eval_subset(d: DataConfig, cache: LabelCache | None, seed: int) -> Dataset:
    """The first ``eval_samples`` of the eval set, un-augmented (of the training set, labelled, when none is set)."""
    if d.eval is None and cache is not None:
        from compress.distill.label_cache import LabelledDataset

        base = LabelledDataset(build_dataset(d.train, seed=seed), cache, seed=seed)
    else:
        base = build_dataset(d.train if d.eval is None else d.eval, seed=seed)
    return Subset(base, range(min(d.eval_samples, len(base))))


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
