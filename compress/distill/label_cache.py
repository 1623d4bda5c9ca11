"""Teacher pseudo-label cache: run the teacher once over a dataset, keep on disk what distillation needs.

Layout of a cache folder::

    manifest.json        teacher identity, dataset fingerprint, label settings, fields, done indices
    disp.npy             N x 1 x H x W  final teacher disparity (image pixels)
    prob.npy             N x D x h x w  disparity distribution (softmax of cost_logits), prob='full'
    prob_topk_values.npy N x k x h x w  the k largest probabilities per pixel, prob='topk'
    prob_topk_index.npy  N x k x h x w  their disparity levels (int16), prob='topk'
    feat_l{L}.npy        N x C x H/s x W/s  left feature of pyramid level L (stride s), when requested

Every .npy is preallocated with ``np.lib.format.open_memmap`` and filled index by index. The manifest's
done-mask is rewritten (atomically) every ``flush_every`` samples and at the end, always after flushing the
memory maps, so a killed run resumes where it stopped and never trusts a half-written sample. A manifest
made by another teacher, another dataset or other label settings raises :class:`LabelCacheError`.

Bytes per sample, for an H x W image, teacher volume scale s (4), D = max_disp / s levels, pooling k
(``prob_downsample``) and b = 2 (float16) or 4 (float32) bytes per value:

* disparity: H * W * b
* prob 'full': D * (H / (s k)) * (W / (s k)) * b
* prob 'topk': topk * (H / (s k)) * (W / (s k)) * (b + 2)
* feature level L with C_L channels at stride s_L: C_L * (H / s_L) * (W / s_L) * b

For the official teacher (max_disp 416, so D = 104) on 512 x 960 crops in float16: disparity 0.98 MB, full
prob 6.4 MB, top-8 prob 0.98 MB, top-8 with k = 2 0.25 MB; a 1/4 feature of C channels C * 61 kB.
:meth:`LabelCache.bytes_per_sample` reports the exact figure of a cache.

Labels are made on the un-augmented images (each sample centre-cropped to the cache size, a multiple of 32).
Augmentation must treat labels consistently: :class:`LabelledDataset` applies random crops to the sample and
to every label field alike (crop offsets are multiples of the coarsest label stride, so label pixels stay
aligned) and optional colour jitter (photometric, so the labels stay valid). Rescaling or flipping cannot be
applied to cached labels; use a live teacher for those.

The format the builder and the readers share (manifest, identities, resume ranges, memory-mapped fields, the
centre-cropped sample a label belongs to) lives in :mod:`compress.distill.label_format`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from compress.cuda_graph import GraphedForward
from compress.data.augment import AugmentConfig, colour_jitter, crop_sample
from compress.data.sample import StereoDataset, StereoSample
from compress.errors import ConfigError, DataError
from compress.terminal import console, progress_bar
from teacher.inference import model_iters

from .config import LabelCacheConfig
from .label_format import (
    CACHE_FORMAT,
    CACHE_VERSION,
    MANIFEST,
    LabelCacheError,
    allocate_fields,
    as_tensors,
    base_sample,
    cache_progress,
    crop_item,
    dataset_fingerprint,
    diff,
    file_sha256,
    from_ranges,
    jsonable,
    open_fields,
    read_manifest,
    sample_name,
    source_size,
    teacher_identity,
    to_ranges,
    write_manifest_json,
)

__all__ = [
    "CACHE_FORMAT",
    "LabelCache",
    "LabelCacheError",
    "LabelledDataset",
    "build_label_cache",
    "cache_progress",
    "dataset_fingerprint",
    "file_sha256",
    "teacher_identity",
]


# ---------------------------------------------------------------------------------------------- labelling


def _teacher_arrays(out: Any, cfg: LabelCacheConfig) -> dict[str, torch.Tensor]:
    """The per-batch label tensors (CPU, storage dtype) of one teacher StereoOutput."""
    arrays: dict[str, torch.Tensor] = {}
    dtype = {"float16": torch.float16, "float32": torch.float32}
    arrays["disp"] = out.disp.float().cpu().to(dtype[cfg.disp_dtype])
    if cfg.prob != "none":
        if out.cost_logits is None:
            raise ConfigError("the teacher returned no cost_logits; set the label cache prob to 'none'")
        prob = torch.softmax(out.cost_logits.float(), dim=1)
        if cfg.prob_downsample > 1:
            h, w = prob.shape[-2:]
            k = cfg.prob_downsample
            if h % k or w % k:
                raise ConfigError(f"prob_downsample {k} does not divide the teacher volume size {h}x{w} "
                                  "(height x width)")
            prob = F.avg_pool2d(prob, k)
        if cfg.prob == "full":
            arrays["prob"] = prob.cpu().to(dtype[cfg.prob_dtype])
        else:
            k = min(cfg.prob_topk, prob.shape[1])
            values, index = torch.topk(prob, k, dim=1)
            arrays["prob_topk_values"] = values.cpu().to(dtype[cfg.prob_dtype])
            arrays["prob_topk_index"] = index.cpu().to(torch.int16)
    for level in cfg.feature_levels:
        if level >= len(out.features_left):
            raise ConfigError(
                f"label cache feature level {level} requested but the teacher has {len(out.features_left)} levels"
            )
        arrays[f"feat_l{level}"] = out.features_left[level].float().cpu().to(dtype[cfg.feature_dtype])
    return arrays


def _describe_fields(arrays: dict[str, torch.Tensor], size: tuple[int, int]) -> dict[str, Any]:
    fields = {}
    for name, t in arrays.items():
        per = list(t.shape[1:])
        stride = size[0] // per[-2]
        fields[name] = {
            "file": f"{name}.npy",
            "shape": per,
            "dtype": str(t.numpy().dtype),
            "stride": int(stride),
        }
    return fields


def build_label_cache(
    teacher: nn.Module,
    dataset: Dataset,
    root: str | os.PathLike,
    cfg: LabelCacheConfig | None = None,
    *,
    iters: int | None = None,
    size: tuple[int, int] | list[int] | None = None,
    checkpoint: str | os.PathLike | None = None,
    identity: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> LabelCache:
    """Label every not-yet-labelled sample of ``dataset`` with ``teacher`` into the cache at ``root``.

    ``iters``: the teacher's GRU iterations (None: its own count); ``size``: the [height, width] every sample is
    centre-cropped to (None: the first sample's size rounded down to multiples of 32, which every sample must then
    share). Resumes a partial cache made by the same teacher on the same dataset with the same settings; raises
    LabelCacheError when the existing manifest disagrees. ``identity`` defaults to
    :func:`teacher_identity` of the teacher (and its ``checkpoint`` file, if given).
    """
    cfg = cfg or LabelCacheConfig()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    if n == 0:
        raise DataError("cannot label an empty dataset")
    if device is None:
        param = next(teacher.parameters(), None)
        device = param.device if param is not None else "cpu"
    device = torch.device(device)
    iters = model_iters(teacher, iters, key="teacher.iters")  # official teacher: valid_iters
    identity = identity if identity is not None else teacher_identity(teacher, checkpoint)
    fingerprint = dataset_fingerprint(dataset)
    if size is not None:
        size = (int(size[0]), int(size[1]))
    else:
        h, w = source_size(dataset, 0)
        size = (h // 32 * 32, w // 32 * 32)
        if 0 in size:
            raise DataError(f"the first sample is {h}x{w} (height x width); the teacher needs images of at least 32x32")
    # The same keys in the same order as when iters and size were fields of the config: old manifests still match.
    labels = {**cfg.content_key(), "iters": iters, "size": list(size)}

    manifest = read_manifest(root)
    if manifest is not None:
        problems = diff(manifest["teacher"], identity, "teacher.")
        problems += diff(manifest["dataset"], fingerprint, "dataset.")
        problems += diff(manifest["labels"], jsonable(labels), "labels.")
        if problems:
            shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
            raise LabelCacheError(
                f"label cache {root} was made for another teacher, dataset or label settings ({shown}); "
                "use a new cache folder, or delete this one to label again"
            )
        done = from_ranges(manifest["done"], n)
        names: list[str | None] = list(manifest["names"])
        arrays = open_fields(root, manifest, "r+")
    else:
        manifest = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "teacher": identity,
            "dataset": fingerprint,
            "labels": jsonable(labels),
            "num_samples": n,
        }
        done = np.zeros(n, dtype=bool)
        names = [None] * n
        arrays = None

    def persist() -> None:
        if arrays is None:
            return
        for arr in arrays.values():
            arr.flush()
        manifest["done"] = to_ranges(done)
        manifest["names"] = names
        manifest["complete"] = bool(done.all())
        write_manifest_json(root / MANIFEST, manifest)

    pending = np.flatnonzero(~done).tolist()
    if pending and len(pending) < n:  # said even without progress: where a resumed labelling goes on from
        console().print(f"labels: {n - len(pending)} of {n} pairs cached in {root}, labelling the rest",
                        markup=False, soft_wrap=True)
    teacher_was_training = teacher.training
    teacher.eval()

    def label(left: torch.Tensor, right: torch.Tensor) -> Any:
        with torch.inference_mode():
            return teacher(left, right, iters=iters, test_mode=True, return_intermediates=True)

    # On a GPU the whole teacher forward replays from one CUDA graph per batch shape (launch-bound otherwise).
    forward = GraphedForward(label, max_graphs=1)  # the last, smaller batch runs eagerly: no second graph pool
    bar = progress_bar(total=n, initial=n - len(pending), desc="labelling with the teacher", disable=not progress)
    since_flush = 0
    try:
        for start in range(0, len(pending), cfg.batch_size):
            chunk = pending[start : start + cfg.batch_size]
            bases = [base_sample(dataset, i, size) for i in chunk]
            items = [as_tensors(b) for b in bases]
            left = torch.stack([it["left"] for it in items]).to(device)
            right = torch.stack([it["right"] for it in items]).to(device)
            out = forward(left, right)
            batch_arrays = _teacher_arrays(out, cfg)
            if arrays is None:
                manifest["fields"] = _describe_fields(batch_arrays, size)
                manifest["prob"] = {
                    "mode": cfg.prob,
                    "num_disp": int(out.cost_logits.shape[1]) if out.cost_logits is not None else 0,
                    "volume_scale": int(getattr(out, "volume_scale", 4)),
                    "downsample": cfg.prob_downsample,
                }
                manifest["features"] = {
                    str(level): manifest["fields"][f"feat_l{level}"]["stride"] for level in cfg.feature_levels
                }
                arrays = allocate_fields(root, manifest["fields"], n)
                persist()
            for name, t in batch_arrays.items():
                values = t.numpy()
                for j, i in enumerate(chunk):
                    arrays[name][i] = values[j]
            for b, i in zip(bases, chunk, strict=True):
                done[i] = True
                names[i] = sample_name(b, i)
            since_flush += len(chunk)
            bar.update(len(chunk))
            if since_flush >= cfg.flush_every:
                persist()
                since_flush = 0
    finally:
        # Only samples written in full are marked done, so saving progress on any exit is safe.
        persist()
        bar.close()
        teacher.train(teacher_was_training)
    return LabelCache(root)


# ------------------------------------------------------------------------------------------------ reading


class LabelCache:
    """Read access to a finished (or partial) label cache; memory maps open lazily, once per process."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        manifest = read_manifest(self.root)
        if manifest is None:
            raise LabelCacheError(f"{self.root} holds no label cache ({MANIFEST} is missing); label it first")
        self.manifest = manifest
        self.num_samples = int(manifest["num_samples"])
        self.done = from_ranges(manifest.get("done", []), self.num_samples)
        self.names: list[str | None] = list(manifest.get("names", [None] * self.num_samples))
        self.size = tuple(manifest["labels"]["size"])
        self.fields: dict[str, Any] = manifest.get("fields", {})
        self.prob: dict[str, Any] = manifest.get("prob", {"mode": "none", "volume_scale": 4})
        self.feature_strides = {int(k): int(v) for k, v in manifest.get("features", {}).items()}
        self._arrays: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.num_samples

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = None  # reopen in each DataLoader worker rather than pickling mapped data
        return state

    @property
    def complete(self) -> bool:
        """Whether every sample is labelled."""
        return bool(self.done.all())

    @property
    def teacher(self) -> dict[str, Any]:
        """The identity of the teacher that made the labels."""
        return self.manifest["teacher"]

    def arrays(self) -> dict[str, np.ndarray]:
        """The read-only memory-mapped fields."""
        if self._arrays is None:
            self._arrays = open_fields(self.root, self.manifest, "r") or {}
        return self._arrays

    def bytes_per_sample(self) -> int:
        """Disk bytes one sample's labels take."""
        return int(sum(math.prod(f["shape"]) * np.dtype(f["dtype"]).itemsize for f in self.fields.values()))

    def align(self) -> int:
        """Crop offsets must be multiples of this (the coarsest stride of a stored field)."""
        return max([int(f["stride"]) for f in self.fields.values()] + [1])

    def labels(self, index: int) -> dict[str, np.ndarray]:
        """The raw stored arrays of sample ``index`` (copies)."""
        self._check_done(index)
        return {name: np.array(arr[index]) for name, arr in self.arrays().items()}

    def _check_done(self, index: int) -> None:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"label index {index} out of range for a cache of {self.num_samples} samples")
        if not self.done[index]:
            raise LabelCacheError(f"sample {index} of label cache {self.root} is not labelled yet; resume labelling")

    def targets(self, index: int, window: tuple[int, int, int, int] | None = None) -> dict[str, Any]:
        """Float32 tensors the losses read, for sample ``index`` cropped to ``window`` (top, left, h, w).

        Keys: teacher_disp (1 x H x W), teacher_prob (D x h x w, dense, sums to 1; absent when not stored),
        teacher_prob_scale (int), teacher_feat ({stride: C x h x w}).
        """
        self._check_done(index)
        arrays = self.arrays()

        def cut(name: str) -> np.ndarray:
            arr = arrays[name][index]
            if window is None:
                return np.asarray(arr)
            s = int(self.fields[name]["stride"])
            top, left, h, w = window
            return np.asarray(arr[..., top // s : (top + h) // s, left // s : (left + w) // s])

        out: dict[str, Any] = {"teacher_disp": torch.from_numpy(cut("disp").astype(np.float32))}
        out["teacher_prob_scale"] = int(self.prob.get("volume_scale", 4))
        if "prob" in arrays:
            out["teacher_prob"] = torch.from_numpy(cut("prob").astype(np.float32))
        elif "prob_topk_values" in arrays:
            values = torch.from_numpy(cut("prob_topk_values").astype(np.float32))
            index_t = torch.from_numpy(cut("prob_topk_index").astype(np.int64))
            dense = torch.zeros((int(self.prob["num_disp"]), *values.shape[1:]), dtype=torch.float32)
            dense.scatter_(0, index_t, values)
            # The dropped tail's mass is spread over the kept levels in proportion to their probability.
            out["teacher_prob"] = dense / dense.sum(dim=0, keepdim=True).clamp_min(1e-12)
        out["teacher_feat"] = {
            str(stride): torch.from_numpy(cut(f"feat_l{level}").astype(np.float32))
            for level, stride in self.feature_strides.items()
        }
        return out


class LabelledDataset(Dataset):
    """A source dataset with its cached teacher labels beside each sample (the teacher never runs).

    Items are ``sample_to_tensors`` dicts of the un-augmented sample (centre-cropped to the cache size) plus
    :meth:`LabelCache.targets` and ``index``. With ``crop_size`` a random window (offsets multiples of
    :meth:`LabelCache.align`) crops the sample and all labels alike; ``jitter_prob`` applies colour jitter to
    the images only. Randomness comes from (seed, epoch, index), as in StereoDataset.
    """

    def __init__(
        self,
        source: Dataset,
        cache: LabelCache | str | os.PathLike,
        crop_size: tuple[int, int] | list[int] | None = None,
        jitter_prob: float = 0.0,
        jitter: AugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        self.source = source
        self.cache = cache if isinstance(cache, LabelCache) else LabelCache(cache)
        self.seed = int(seed)
        self.epoch = 0
        self.jitter_prob = float(jitter_prob)
        self.jitter = jitter or AugmentConfig()
        if len(source) != self.cache.num_samples:
            raise LabelCacheError(
                f"the dataset has {len(source)} samples but label cache {self.cache.root} has "
                f"{self.cache.num_samples}; it was made for another dataset"
            )
        problems = diff(self.cache.manifest["dataset"], dataset_fingerprint(source), "dataset.")
        if problems:
            raise LabelCacheError(
                f"label cache {self.cache.root} was made for another dataset ({'; '.join(problems[:4])}); "
                "label this dataset into a new folder"
            )
        if not self.cache.complete:
            raise LabelCacheError(
                f"label cache {self.cache.root} has {int(self.cache.done.sum())} of {self.cache.num_samples} "
                "samples labelled; resume labelling first"
            )
        if isinstance(source, StereoDataset) and source.transform is not None:
            raise ConfigError(
                "the source dataset of a LabelledDataset must have no transform: labels match un-augmented "
                "images; pass crop_size/jitter_prob to LabelledDataset instead"
            )
        if self.jitter_prob > 0 and not isinstance(source, StereoDataset):
            raise ConfigError("colour jitter needs a StereoDataset source (it works on StereoSample images)")
        self.crop_size = None if crop_size is None else (int(crop_size[0]), int(crop_size[1]))
        if self.crop_size is not None:
            a = self.cache.align()
            ch, cw = self.crop_size
            if ch % a or cw % a or ch > self.cache.size[0] or cw > self.cache.size[1]:
                raise ConfigError(
                    f"crop {ch}x{cw} (height x width) must be multiples of {a} (the coarsest cached label stride) and "
                    f"fit the cached size {self.cache.size[0]}x{self.cache.size[1]}"
                )

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation stream (call once per epoch)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        base = base_sample(self.source, index, self.cache.size)
        expected = self.cache.names[index]
        if expected is not None and sample_name(base, index) != expected:
            raise LabelCacheError(
                f"sample {index} is {sample_name(base, index)!r} but its cached label belongs to {expected!r}; the "
                "dataset changed since labelling"
            )
        window = None
        if self.crop_size is not None:
            a = self.cache.align()
            h, w = self.cache.size
            ch, cw = self.crop_size
            top = int(rng.integers(0, (h - ch) // a + 1)) * a
            left = int(rng.integers(0, (w - cw) // a + 1)) * a
            window = (top, left, ch, cw)
            if isinstance(base, StereoSample):
                base = crop_sample(base, top, left, ch, cw)
            else:
                base = crop_item(base, top, left, ch, cw)
        if self.jitter_prob > 0 and rng.random() < self.jitter_prob:
            base = colour_jitter(base, self.jitter, rng)
        item = as_tensors(base)
        item.update(self.cache.targets(index, window))
        item["index"] = index
        return item
