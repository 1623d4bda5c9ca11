"""The on-disk format of a teacher label cache, shared by its writer and its readers (compress.distill.label_cache):
the manifest (teacher identity, dataset fingerprint, label settings, done ranges), the memory-mapped fields and the
centre-cropped sample every label belongs to."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from compress.atomic import atomic_write_bytes, sha256_file
from compress.data.augment import crop_sample
from compress.data.sample import StereoDataset, StereoSample, sample_to_tensors
from compress.data.synthetic import SyntheticStereoDataset
from compress.errors import DataError

CACHE_FORMAT = "ffsc-label-cache"
CACHE_VERSION = 1
MANIFEST = "manifest.json"
IMAGE_KEYS = ("left", "right", "disp", "valid", "nonocc")


class LabelCacheError(DataError):
    """A label cache does not match the teacher, dataset or settings it is used with, or is incomplete."""


# ------------------------------------------------------------------------------------------- identities


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex)."""
    if not Path(path).is_file():
        raise DataError(f"{path} does not exist")
    return sha256_file(path)


def _weights_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON data (what a manifest holds)."""
    return json.loads(json.dumps(obj, default=str))


def teacher_identity(model: nn.Module, checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """Who made the labels: model class, config, a hash of its weights and of its checkpoint file."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        cfg_dict = cfg.to_dict()
    elif cfg is not None and dataclasses.is_dataclass(cfg):
        cfg_dict = dataclasses.asdict(cfg)
    else:
        cfg_dict = None
    ident: dict[str, Any] = {
        "class": type(model).__name__,
        "config": cfg_dict,
        "weights_sha256": _weights_sha256(model),
        "checkpoint_sha256": None,
    }
    if checkpoint is not None:
        ident["checkpoint_sha256"] = file_sha256(checkpoint)
    return jsonable(ident)


def dataset_fingerprint(dataset: Dataset) -> dict[str, Any]:
    """Size, sample names (where known without loading) and generator settings of a dataset."""
    if isinstance(dataset, Subset):
        return {"subset_of": dataset_fingerprint(dataset.dataset), "indices": [int(i) for i in dataset.indices]}
    fp: dict[str, Any] = {"type": type(dataset).__name__, "size": len(dataset)}
    records = getattr(dataset, "records", None)
    if records:
        fp["names"] = [r.name for r in records]
    if isinstance(dataset, SyntheticStereoDataset):
        syn = dataclasses.asdict(dataset.config)
        # Settings of generator features that are off are left out, so caches made before they existed match.
        if syn["texture_dir"] is None:
            del syn["texture_dir"], syn["photo_prob"]
        if syn["max_disp_low"] is None:
            del syn["max_disp_low"]
        fp["synthetic"] = syn
    return jsonable(fp)


def diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Human-readable differences between two JSON values (first levels only for long lists)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}{k}: {'missing' if k not in a else 'present'} in the cache")
            else:
                out.extend(diff(a[k], b[k], f"{path}{k}."))
        return out
    if a != b:
        if isinstance(a, list) and isinstance(b, list):
            return [f"{path.rstrip('.')}: lists differ (cache {len(a)} items, now {len(b)})"]
        return [f"{path.rstrip('.')}: cache {a!r}, now {b!r}"]
    return []


# -------------------------------------------------------------------------------------------- samples


def source_size(dataset: Dataset, index: int) -> tuple[int, int]:
    """(height, width) of sample ``index`` before any crop."""
    if isinstance(dataset, StereoDataset):
        s = dataset.load(index)
        return s.height, s.width
    item = dataset[index]
    return tuple(item["left"].shape[-2:])


def _centre_window(hw: tuple[int, int], size: tuple[int, int], name: str) -> tuple[int, int]:
    h, w = hw
    th, tw = size
    if h < th or w < tw:
        raise DataError(
            f"sample {name!r} is {h}x{w} (height x width), smaller than the label cache size {th}x{tw}; set "
            "data.size to at most the smallest image of the dataset"
        )
    return (h - th) // 2, (w - tw) // 2


def crop_item(item: dict[str, Any], top: int, left: int, h: int, w: int) -> dict[str, Any]:
    """A tensor sample dict cut to the window (top, left, h, w)."""
    out = dict(item)
    for key in IMAGE_KEYS:
        if key in out and isinstance(out[key], torch.Tensor):
            out[key] = out[key][..., top : top + h, left : left + w]
    return out


def base_sample(dataset: Dataset, index: int, size: tuple[int, int]) -> StereoSample | dict[str, Any]:
    """Sample ``index`` without augmentation, centre-cropped to the cache size (a StereoSample when possible)."""
    if isinstance(dataset, StereoDataset):
        sample = dataset.load(index)
        top, left = _centre_window((sample.height, sample.width), size, sample.name)
        if (sample.height, sample.width) != tuple(size):
            sample = crop_sample(sample, top, left, *size)
        return sample
    item = dataset[index]
    hw = tuple(item["left"].shape[-2:])
    top, left = _centre_window(hw, size, str(item.get("name", index)))
    return crop_item(item, top, left, *size)


def as_tensors(base: StereoSample | dict[str, Any]) -> dict[str, Any]:
    """The tensor dict of a sample ``base_sample`` returned."""
    return sample_to_tensors(base) if isinstance(base, StereoSample) else base


def sample_name(base: StereoSample | dict[str, Any], index: int) -> str:
    """The name a sample is recorded under in the manifest."""
    return base.name if isinstance(base, StereoSample) else str(base.get("name", index))


# ---------------------------------------------------------------------------------------------- ranges


def to_ranges(done: np.ndarray) -> list[list[int]]:
    """A done-mask as [start, end) ranges (the manifest's compact form)."""
    idx = np.flatnonzero(done)
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) > 1)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], [idx[-1]]]) + 1
    return [[int(s), int(e)] for s, e in zip(starts, ends, strict=True)]


def from_ranges(ranges: list[list[int]], n: int) -> np.ndarray:
    """The done-mask of ``n`` samples that ``ranges`` mark."""
    done = np.zeros(n, dtype=bool)
    for start, end in ranges:
        done[start:end] = True
    return done


def write_manifest_json(path: Path, data: dict[str, Any]) -> None:
    """Write a manifest atomically."""
    atomic_write_bytes(path, json.dumps(data, indent=1).encode())


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of the cache at ``root`` (None when there is none); another format or version is refused."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LabelCacheError(f"{path} is unreadable ({exc}); delete the cache folder and label again") from None
    if data.get("format") != CACHE_FORMAT:
        raise LabelCacheError(f"{path} is not an ffsc label cache manifest (format {data.get('format')!r})")
    if data.get("version") != CACHE_VERSION:
        raise LabelCacheError(
            f"{path} is label cache version {data.get('version')}, this ffsc reads version {CACHE_VERSION}; "
            "label again into a new folder"
        )
    return data


def cache_progress(root: str | os.PathLike) -> tuple[int, int] | None:
    """(labelled, total) samples of the cache at ``root``, or None when there is none yet."""
    manifest = read_manifest(Path(root))
    if manifest is None:
        return None
    n = int(manifest["num_samples"])
    return int(from_ranges(manifest["done"], n).sum()), n


def allocate_fields(root: Path, fields: dict[str, Any], n: int) -> dict[str, np.memmap]:
    """Preallocate every field's .npy for ``n`` samples as a writable memory map."""
    arrays = {}
    for name, info in fields.items():
        arrays[name] = np.lib.format.open_memmap(
            root / info["file"], mode="w+", dtype=np.dtype(info["dtype"]), shape=(n, *info["shape"])
        )
    return arrays


def open_fields(root: Path, manifest: dict[str, Any], mode: str) -> dict[str, np.memmap] | None:
    """The manifest's fields as memory maps (None before the first batch); a missing or mis-shaped file is refused."""
    fields = manifest.get("fields")
    if not fields:
        return None
    n = int(manifest["num_samples"])
    arrays = {}
    for name, info in fields.items():
        path = root / info["file"]
        try:
            arr = np.load(path, mmap_mode=mode)
        except (OSError, ValueError) as exc:
            raise LabelCacheError(
                f"label cache field {path} is missing or unreadable ({exc}); delete {root} and label again"
            ) from None
        expected = (n, *info["shape"])
        if arr.shape != expected or arr.dtype != np.dtype(info["dtype"]):
            raise LabelCacheError(
                f"label cache field {path} is {arr.dtype} {arr.shape}, the manifest says {info['dtype']} "
                f"{expected}; delete {root} and label again"
            )
        arrays[name] = arr
    return arrays
