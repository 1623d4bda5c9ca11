"""Calibration and held-out frames: stereo pairs from a label cache, a data folder or synthetic scenes, fitted to
the exported graph's input size."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compress.data.augment import crop_sample, scale_sample
from compress.data.readers import StereoDataset, open_dataset
from compress.data.synthetic import SyntheticConfig, SyntheticStereoDataset
from compress.distill.label_cache import MANIFEST
from compress.errors import DataError
from compress.export.runtime import INPUT_NAMES


@dataclass
class CalibrationFrame:
    """One stereo pair as the exported graph takes it (1 x 3 x H x W float32, 0..255), with its ground truth:
    the unit of calibration, sensitivity and held-out checks."""

    left: np.ndarray
    right: np.ndarray
    disp: np.ndarray | None = None
    valid: np.ndarray | None = None

    def feeds(self) -> dict[str, np.ndarray]:
        """ONNX Runtime input feed."""
        return {INPUT_NAMES[0]: self.left, INPUT_NAMES[1]: self.right}



def _fit(sample, height: int, width: int):
    """Centre-crop a sample to height x width when it is large enough, else rescale it."""
    if sample.height >= height and sample.width >= width:
        return crop_sample(sample, (sample.height - height) // 2, (sample.width - width) // 2, height, width)
    return scale_sample(sample, height, width)


def _synthetic(count: int, height: int, width: int, seed: int):
    max_disp = float(max(8, min(64, width // 5)))
    return SyntheticStereoDataset(count, SyntheticConfig(height=height, width=width, max_disp=max_disp, seed=seed))


def open_frames_source(source: Any, count: int, height: int, width: int, seed: int = 0):
    """A dataset of stereo samples from a label cache folder, a data folder, 'synthetic' or a Dataset."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    if str(source) == "synthetic":
        return _synthetic(count, height, width, seed)
    root = Path(source)
    if (root / MANIFEST).is_file():
        manifest = json.loads((root / MANIFEST).read_text())
        dataset = manifest.get("dataset", {})
        synth = dataset.get("synthetic")
        if synth is None:
            raise DataError(f"label cache {root} was made from files ({dataset.get('type', '?')}); it keeps labels, "
                            "not images: pass the data folder it was labelled from as --calib")
        synth = {k: tuple(v) if isinstance(v, list) else v for k, v in synth.items()}
        return SyntheticStereoDataset(int(dataset["size"]), SyntheticConfig(**synth))
    if not root.exists():
        raise DataError(f"--calib {source}: no such folder; pass a label cache folder, a stereo data folder or "
                        "'synthetic'")
    return open_dataset(root)


def load_frames(
    source: Any, count: int, height: int, width: int, seed: int = 0, offset: int = 0
) -> list[CalibrationFrame]:
    """``count`` frames (from index ``offset``) of a frames source, fitted to height x width."""
    dataset = open_frames_source(source, offset + count, height, width, seed)
    if len(dataset) < offset + count:
        raise DataError(f"the calibration source has {len(dataset)} pairs; {offset + count} are needed "
                        f"({offset} before these {count}); lower calib_frames/eval_frames or add data")
    frames = []
    for i in range(offset, offset + count):
        sample = dataset.load(i) if isinstance(dataset, StereoDataset) else dataset[i]
        if isinstance(sample, dict):  # a Dataset of tensor dicts (e.g. LabelledDataset)
            left, right = sample["left"].numpy(), sample["right"].numpy()
            if left.shape[-2:] != (height, width):
                raise DataError(f"calibration item {i} is {left.shape[-2]}x{left.shape[-1]} (height x width), "
                                f"the model takes {height}x{width}")
            disp = sample["disp"][0].numpy() if bool(sample.get("has_gt", False)) else None
            valid = sample["valid"][0].numpy() if disp is not None else None
        else:
            sample = _fit(sample, height, width)
            left = np.ascontiguousarray(sample.left.transpose(2, 0, 1), dtype=np.float32)
            right = np.ascontiguousarray(sample.right.transpose(2, 0, 1), dtype=np.float32)
            disp, valid = sample.disp, sample.valid
        frames.append(CalibrationFrame(left[None].astype(np.float32), right[None].astype(np.float32), disp, valid))
    return frames

