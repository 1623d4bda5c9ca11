"""A user's own unlabeled stereo footage: corrupt frames skipped and counted, a fixed held-out split."""

from __future__ import annotations

import os
import warnings
from typing import ClassVar

from compress.errors import ConfigError, DataError

from .io import read_image
from .readers import DATASET_KINDS, PairRecord, StereoPairFolder
from .sample import Transform

SPLITS = ("train", "heldout", "all")


class OwnFootageFolder(StereoPairFolder):
    """Unlabeled pairs (the ``pairs`` layouts) with every frame checked once; unreadable frames are skipped.

    A frame whose left or right image cannot be decoded, or whose views differ in size, is skipped with a
    warning and counted (``bad_frames``); more than ``max_bad_fraction`` of them is a DataError. Every
    ``round(1 / heldout_fraction)``-th frame (by name) is held out: ``split='train'`` leaves those out,
    ``split='heldout'`` keeps only them, so both sides of a run see the same split.
    """

    kind: ClassVar[str] = "own_footage"

    def __init__(self, root: str | os.PathLike, transform: Transform | None = None, seed: int = 0,
                 split: str = "train", heldout_fraction: float = 0.1, max_bad_fraction: float = 0.05) -> None:
        if split not in SPLITS:
            raise ConfigError(f"own_footage split: got {split!r}, expected one of {SPLITS}")
        if not 0.0 <= heldout_fraction < 1.0:
            raise ConfigError(f"own_footage heldout_fraction: got {heldout_fraction}, expected within [0, 1)")
        if not 0.0 <= max_bad_fraction < 1.0:
            raise ConfigError(f"own_footage max_bad_fraction: got {max_bad_fraction}, expected within [0, 1)")
        super().__init__(root, transform=transform, seed=seed)
        good, self.bad_frames = self._check(self.records)
        total = len(self.records)
        if len(self.bad_frames) > max_bad_fraction * total:
            name, reason = self.bad_frames[0]
            raise DataError(
                f"{self.root}: {len(self.bad_frames)} of {total} frames are unreadable "
                f"({100 * len(self.bad_frames) / total:.1f}%, more than max_bad_fraction={max_bad_fraction:g}); "
                f"first: {name} ({reason})"
            )
        self.total_frames = total
        every = round(1 / heldout_fraction) if heldout_fraction > 0 else 0
        held = [every and i % every == every - 1 for i in range(len(good))]
        if split == "train":
            good = [r for r, h in zip(good, held, strict=True) if not h]
        elif split == "heldout":
            good = [r for r, h in zip(good, held, strict=True) if h]
        if not good:
            raise DataError(f"{self.root}: no {split} frames left (of {total}; heldout_fraction={heldout_fraction})")
        self.records = good

    def _check(self, records: list[PairRecord]) -> tuple[list[PairRecord], list[tuple[str, str]]]:
        good, bad = [], []
        for rec in records:
            try:
                left, right = read_image(rec.left), read_image(rec.right)
                if left.shape != right.shape:
                    raise DataError(f"left {left.shape[0]}x{left.shape[1]}, right {right.shape[0]}x{right.shape[1]} "
                                    "(height x width)")
            except (DataError, OSError, ValueError) as exc:
                reason = str(exc).splitlines()[0]
                warnings.warn(f"{self.root}: skipping frame {rec.name}: {reason}", stacklevel=2)
                bad.append((rec.name, reason))
                continue
            good.append(rec)
        return good, bad


DATASET_KINDS.setdefault(OwnFootageFolder.kind, OwnFootageFolder)
__all__ = ["SPLITS", "OwnFootageFolder"]
