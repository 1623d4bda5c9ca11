"""The in-memory stereo sample every source yields (``StereoSample``, as tensors ``sample_to_tensors``) and the
dataset base class (``StereoDataset``: per-index randomness, a transform, a health check) readers and synthetic
pairs share."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from compress.errors import DataError
from compress.terminal import progress_bar

__all__ = ["StereoDataset", "StereoSample", "Transform", "sample_to_tensors"]

def shape_text(shape: Sequence[int]) -> str:
    """An array shape as ``HxW`` text for error messages, height first as every size the project prints."""
    return f"{shape[0]}x{shape[1]} (height x width)"


@dataclass
class StereoSample:
    """One rectified stereo pair with optional ground truth, as numpy arrays.

    left/right: uint8 HxWx3 RGB. disp: float32 HxW left-view disparity in pixels (None when unlabeled).
    valid: bool HxW, True where disp is ground truth (derived from disp when omitted).
    nonocc: bool HxW, True where the pixel is visible in both views (None when the dataset has no mask).
    calib: parsed calibration (Middlebury-style keys) when the dataset provides one.
    """

    left: np.ndarray
    right: np.ndarray
    disp: np.ndarray | None = None
    valid: np.ndarray | None = None
    name: str = ""
    nonocc: np.ndarray | None = None
    calib: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        where = f"sample {self.name!r}" if self.name else "stereo sample"
        for view in ("left", "right"):
            arr = getattr(self, view)
            if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
                got = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
                raise DataError(f"{where}: {view} image must be a uint8 HxWx3 array, got {got}.")
        hw = self.left.shape[:2]
        if self.right.shape[:2] != hw:
            raise DataError(
                f"{where}: right image is {shape_text(self.right.shape)} but left is {shape_text(hw)}; views must "
                "match."
            )
        if self.disp is not None:
            self.disp = np.asarray(self.disp, dtype=np.float32)
            if self.disp.shape != hw:
                raise DataError(f"{where}: disparity is {self.disp.shape}, expected {hw} like the left image.")
            if self.valid is None:
                self.valid = np.isfinite(self.disp) & (self.disp > 0)
        elif self.valid is not None:
            raise DataError(f"{where}: has a valid mask but no disparity.")
        for key in ("valid", "nonocc"):
            mask = getattr(self, key)
            if mask is not None:
                mask = np.asarray(mask, dtype=bool)
                if mask.shape != hw:
                    raise DataError(f"{where}: {key} mask is {mask.shape}, expected {hw} like the left image.")
                setattr(self, key, mask)

    @property
    def height(self) -> int:
        """Image height in pixels."""
        return int(self.left.shape[0])

    @property
    def width(self) -> int:
        """Image width in pixels."""
        return int(self.left.shape[1])


def sample_to_tensors(sample: StereoSample) -> dict[str, Any]:
    """Convert a sample to the model-facing dict: float 3xHxW views in 0..255, 1xHxW disp/valid/nonocc."""
    h, w = sample.left.shape[:2]
    left = torch.from_numpy(np.ascontiguousarray(sample.left)).permute(2, 0, 1).float()
    right = torch.from_numpy(np.ascontiguousarray(sample.right)).permute(2, 0, 1).float()
    if sample.disp is None:
        disp = np.zeros((h, w), dtype=np.float32)
        valid = np.zeros((h, w), dtype=bool)
    else:
        valid = np.asarray(sample.valid, dtype=bool)
        # Invalid pixels may hold inf/nan; zero them so masked losses cannot turn into nan.
        disp = np.where(valid, sample.disp, 0.0).astype(np.float32)
    nonocc = valid & sample.nonocc if sample.nonocc is not None else valid
    return {
        "left": left,
        "right": right,
        "disp": torch.from_numpy(disp)[None],
        "valid": torch.from_numpy(np.ascontiguousarray(valid))[None],
        "nonocc": torch.from_numpy(np.ascontiguousarray(nonocc))[None],
        "has_gt": torch.tensor(sample.disp is not None),
        "name": sample.name,
    }


Transform = Callable[[StereoSample, np.random.Generator], StereoSample]


class StereoDataset(Dataset):
    """Base of every stereo dataset: subclasses implement __len__ and load(index) -> StereoSample.

    __getitem__ returns sample_to_tensors(...) after the optional transform. Each item's random generator is
    derived from (seed, epoch, index), so augmentation is reproducible whatever the DataLoader worker count.
    Unlabeled samples carry an all-zero disp, an all-False valid mask and has_gt = False.
    """

    kind: ClassVar[str] = "stereo"

    def __init__(self, transform: Transform | None = None, seed: int = 0) -> None:
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> StereoSample:
        """Read sample `index` from disk (or generate it), without any transform."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation stream (call once per epoch)."""
        self.epoch = int(epoch)

    def rng_for(self, index: int) -> np.random.Generator:
        """The random generator the transform receives for item `index` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, index])

    def _resolve(self, index: int) -> int:
        n = len(self)
        i = int(index) + n if int(index) < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {n}")
        return i

    def get_sample(self, index: int) -> StereoSample:
        """load(index) followed by the transform, as a StereoSample."""
        i = self._resolve(index)
        sample = self.load(i)
        if self.transform is not None:
            sample = self.transform(sample, self.rng_for(i))
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        return sample_to_tensors(self.get_sample(index))

    def check(self, progress: bool = True) -> list[str]:
        """Load every sample once; return the DataError messages (empty list = dataset is readable)."""
        problems: list[str] = []
        for i in progress_bar(range(len(self)), desc=f"checking {self.kind}", disable=not progress):
            try:
                self.load(i)
            except DataError as exc:
                problems.append(str(exc))
        return problems
