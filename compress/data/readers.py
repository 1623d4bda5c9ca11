"""Stereo dataset readers: one class per on-disk layout, all yielding StereoSample / tensor dicts.

Layouts: SceneFlow, Middlebury 2014 / MiddEval3, ETH3D two-view, KITTI 2012 / 2015, FoundationStereo's FSD,
and plain folders of unlabeled pairs. `open_dataset` detects the layout of a folder. The sample type and the
dataset base class live in :mod:`compress.data.sample` (re-exported here for the readers' callers).

One module over the ~500-line guide: it is a family of small readers (one class per layout, 30-60 lines each)
sharing the pair-finding helpers and the layout detection of `open_dataset`, which must see all of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from compress.data.io import (
    read_calib,
    read_fsd_disparity,
    read_image,
    read_kitti_disparity,
    read_mask,
    read_pfm,
)
from compress.data.sample import StereoDataset, StereoSample, Transform, sample_to_tensors, shape_text
from compress.errors import ConfigError, DataError

__all__ = [
    "DATASET_KINDS",
    "ETH3DDataset",
    "FSDDataset",
    "FileStereoDataset",
    "IMAGE_EXTENSIONS",
    "Kitti2012Dataset",
    "Kitti2015Dataset",
    "MiddleburyDataset",
    "PairRecord",
    "SceneFlowDataset",
    "StereoDataset",
    "StereoPairFolder",
    "StereoSample",
    "Transform",
    "open_dataset",
    "sample_to_tensors",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff")



# ------------------------------------------------------------------------------------------ file datasets


@dataclass(frozen=True)
class PairRecord:
    """Paths of one sample's files; optional ones are None when the dataset lacks them."""

    name: str
    left: Path
    right: Path
    disp: Path | None = None
    nonocc: Path | None = None
    calib: Path | None = None


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image(p))


def _walk_dirs(root: Path, max_depth: int, prune: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Breadth-first directories under root (root included) down to max_depth, skipping hidden ones."""
    level = [root]
    for depth in range(max_depth + 1):
        nxt: list[Path] = []
        for d in level:
            yield d
            if depth == max_depth or (prune is not None and prune(d)):
                continue
            try:
                children = sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
            except OSError:
                continue
            nxt.extend(children)
        level = nxt


def _find_image(folder: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTENSIONS:
        for candidate in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def _check_same_size(left: Path, left_hw: tuple[int, ...], path: Path, hw: tuple[int, ...], what: str) -> None:
    if tuple(hw) != tuple(left_hw):
        raise DataError(
            f"{path}: {what} is {shape_text(hw)} but the left image {left} is {shape_text(left_hw)}; "
            "both views and the ground truth must have the same size."
        )


def _rel_name(path: Path, root: Path) -> str:
    try:
        rel = path.relative_to(root)
    except ValueError:
        return path.name
    return rel.as_posix() if rel.parts else root.name


class FileStereoDataset(StereoDataset):
    """A dataset backed by a list of PairRecord; subclasses fill `records` in __init__."""

    kind: ClassVar[str] = "files"

    def __init__(self, root: str | os.PathLike, transform: Transform | None = None, seed: int = 0) -> None:
        super().__init__(transform=transform, seed=seed)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: dataset folder not found (expected a {self.kind} dataset here).")
        self.records: list[PairRecord] = []

    def _set_records(self, records: list[PairRecord], expected: str) -> None:
        if not records:
            raise DataError(f"{self.root}: no {self.kind} samples found; expected {expected}.")
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def read_disparity(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """Read a ground-truth disparity file: PFM (inf/nan/<=0 invalid) or KITTI 16-bit PNG."""
        if path.suffix.lower() == ".pfm":
            disp = read_pfm(path)
            if disp.ndim != 2:
                raise DataError(f"{path}: disparity PFM has {disp.shape[2]} channels; expected a grey 'Pf' PFM.")
            return disp, np.isfinite(disp) & (disp > 0)
        if path.suffix.lower() == ".png":
            return read_kitti_disparity(path)
        raise DataError(f"{path}: unknown disparity format {path.suffix!r}; expected .pfm or a KITTI .png.")

    def read_nonocc(self, path: Path) -> np.ndarray:
        """Read the non-occlusion mask (Middlebury/ETH3D: 255 = visible in both views)."""
        return read_mask(path)

    def load(self, index: int) -> StereoSample:
        """Read the record's files, checking that all of them exist and have the left image's size."""
        rec = self.records[index]
        left = read_image(rec.left)
        right = read_image(rec.right)
        hw = left.shape[:2]
        _check_same_size(rec.left, hw, rec.right, right.shape[:2], "right image")
        disp = valid = nonocc = None
        if rec.disp is not None:
            disp, valid = self.read_disparity(rec.disp)
            _check_same_size(rec.left, hw, rec.disp, disp.shape, "disparity")
        if rec.nonocc is not None:
            nonocc = self.read_nonocc(rec.nonocc)
            _check_same_size(rec.left, hw, rec.nonocc, nonocc.shape, "non-occlusion mask")
        calib = None
        if rec.calib is not None:
            calib = read_calib(rec.calib)
            size = (calib.get("height"), calib.get("width"))
            if None not in size and size != hw:
                raise DataError(
                    f"{rec.calib}: says width={size[1]} height={size[0]} but the left image {rec.left} is "
                    f"{shape_text(hw)}; the calibration does not belong to these images."
                )
        return StereoSample(left, right, disp, valid, rec.name, nonocc, calib)


class SceneFlowDataset(FileStereoDataset):
    """SceneFlow (FlyingThings3D / Driving / Monkaa): frames_<pass>pass/**/left/*.png + disparity/**/left/*.pfm.

    root may be the SceneFlow folder holding the three subsets, one subset, or its frames_* folder's parent.
    passes: "clean" and/or "final"; None picks clean when present, else final. split filters on a path
    component such as "TRAIN" or "TEST" (FlyingThings3D).
    """

    kind: ClassVar[str] = "sceneflow"

    def __init__(
        self,
        root: str | os.PathLike,
        passes: Sequence[str] | None = None,
        split: str | None = None,
        transform: Transform | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(root, transform=transform, seed=seed)
        found = {p: _find_named_dirs(self.root, f"frames_{p}pass", 2) for p in ("clean", "final")}
        if passes is None:
            passes = ["clean"] if found["clean"] else ["final"]
        for p in passes:
            if p not in found:
                raise ConfigError(f"SceneFlow pass {p!r} is unknown; expected 'clean' or 'final'.")
        records: list[PairRecord] = []
        for p in passes:
            for frames in found[p]:
                records.extend(self._scan(frames, p, split))
        self._set_records(
            records,
            f"frames_{'/'.join(passes)}pass/**/left/*.png images with disparity/**/left/*.pfm"
            + (f" under a {split!r} folder" if split else ""),
        )

    def _scan(self, frames: Path, pass_name: str, split: str | None) -> list[PairRecord]:
        disp_root = frames.parent / "disparity"
        if not disp_root.is_dir():
            raise DataError(f"{frames}: has no sibling disparity folder; expected {disp_root}.")
        records = []
        for dirpath, dirnames, filenames in os.walk(frames):
            dirnames.sort()
            folder = Path(dirpath)
            if folder.name != "left":
                continue
            rel_folder = folder.relative_to(frames)
            if split is not None and split.lower() not in (part.lower() for part in rel_folder.parts):
                continue
            for fname in sorted(filenames):
                left = folder / fname
                if not _is_image(left):
                    continue
                right = folder.parent / "right" / fname
                if not right.is_file():
                    raise DataError(f"{left}: no matching right image; expected {right}.")
                disp = disp_root / rel_folder / (left.stem + ".pfm")
                if not disp.is_file():
                    raise DataError(f"{left}: no ground-truth disparity; expected {disp}.")
                name = f"{_rel_name(frames.parent, self.root)}/{pass_name}/{(rel_folder / left.stem).as_posix()}"
                records.append(PairRecord(name=name, left=left, right=right, disp=disp))
        return records


def _find_named_dirs(root: Path, name: str, max_depth: int) -> list[Path]:
    return [d for d in _walk_dirs(root, max_depth, prune=lambda d: d.name == name) if d.name == name]


def _scene_dirs(root: Path, max_depth: int = 3) -> list[Path]:
    """Folders holding an im0 image (Middlebury/ETH3D scene folders), root included."""
    return [d for d in _walk_dirs(root, max_depth, prune=lambda d: _find_image(d, "im0") is not None)
            if _find_image(d, "im0") is not None]


class MiddleburyDataset(FileStereoDataset):
    """Middlebury 2014 / MiddEval3 scene folders: im0.png, im1.png, disp0GT.pfm or disp0.pfm, mask0nocc.png,
    calib.txt. Infinite disparity marks unknown pixels; mask0nocc 255 marks pixels visible in both views.

    require_gt=False accepts scenes without ground truth (test splits); gt_root is an optional separate
    folder holding <scene>/disp0GT.pfm and mask0nocc.png (ETH3D ships ground truth as its own archive).
    """

    kind: ClassVar[str] = "middlebury"
    gt_names: ClassVar[tuple[str, ...]] = ("disp0GT.pfm", "disp0.pfm")

    def __init__(
        self,
        root: str | os.PathLike,
        require_gt: bool = True,
        gt_root: str | os.PathLike | None = None,
        transform: Transform | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(root, transform=transform, seed=seed)
        self.gt_root = Path(gt_root) if gt_root is not None else None
        records = [self._record(scene, require_gt) for scene in _scene_dirs(self.root)]
        self._set_records(records, "scene folders holding im0.png, im1.png and " + " or ".join(self.gt_names))

    def _gt_dirs(self, scene: Path) -> list[Path]:
        return [scene] + ([self.gt_root / scene.name] if self.gt_root is not None else [])

    def _record(self, scene: Path, require_gt: bool) -> PairRecord:
        left = _find_image(scene, "im0")
        assert left is not None  # _scene_dirs only returns folders with im0
        right = _find_image(scene, "im1")
        if right is None:
            raise DataError(f"{left}: no matching right image; expected {scene / ('im1' + left.suffix)}.")
        candidates = [d / n for d in self._gt_dirs(scene) for n in self.gt_names]
        disp = next((c for c in candidates if c.is_file()), None)
        if disp is None and require_gt:
            raise DataError(
                f"{scene}: no ground-truth disparity; expected one of {', '.join(str(c) for c in candidates)} "
                "(pass require_gt=False, or kind='pairs', to read unlabeled pairs)."
            )
        nonocc = next((d / "mask0nocc.png" for d in self._gt_dirs(scene) if (d / "mask0nocc.png").is_file()), None)
        calib = scene / "calib.txt"
        return PairRecord(
            name=_rel_name(scene, self.root),
            left=left,
            right=right,
            disp=disp,
            nonocc=nonocc if disp is not None else None,
            calib=calib if calib.is_file() else None,
        )


class ETH3DDataset(MiddleburyDataset):
    """ETH3D two-view scene folders: im0.png, im1.png, disp0GT.pfm, mask0nocc.png, calib.txt (Middlebury format)."""

    kind: ClassVar[str] = "eth3d"
    gt_names: ClassVar[tuple[str, ...]] = ("disp0GT.pfm",)


class _KittiDataset(FileStereoDataset):
    """KITTI: <split>/<left_dir>/NNNNNN_10.png, <right_dir>/..., ground truth <occ_dir>/NNNNNN_10.png.

    root may hold training/ and testing/ or be one of them. Without a ground-truth folder (testing split) the
    *_10.png pairs are read unlabeled. The non-occluded ground truth (<noc_dir>) gives the nonocc mask.
    """

    left_dir: ClassVar[str]
    right_dir: ClassVar[str]
    occ_dir: ClassVar[str]
    noc_dir: ClassVar[str]

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "training",
        transform: Transform | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(root, transform=transform, seed=seed)
        base = self.root / split if (self.root / split / self.left_dir).is_dir() else self.root
        if not (base / self.left_dir).is_dir():
            raise DataError(
                f"{self.root}: not a {self.kind} folder; expected {self.left_dir}/ and {self.right_dir}/ "
                f"in {self.root / split} or {self.root}."
            )
        left_dir, right_dir = base / self.left_dir, base / self.right_dir
        occ_dir, noc_dir = base / self.occ_dir, base / self.noc_dir
        if not right_dir.is_dir():
            raise DataError(f"{left_dir}: has no right-image folder; expected {right_dir}.")
        records = []
        if occ_dir.is_dir():
            for disp in sorted(p for p in occ_dir.iterdir() if p.suffix.lower() == ".png"):
                left = left_dir / disp.name
                if not left.is_file():
                    raise DataError(f"{disp}: ground truth without a left image; expected {left}.")
                records.append(self._record(left, right_dir, disp, noc_dir / disp.name))
        else:
            for left in _images_in(left_dir):
                if left.stem.endswith("_10"):
                    records.append(self._record(left, right_dir, None, None))
        self._set_records(records, f"{self.left_dir}/*_10.png with {self.right_dir}/ and {self.occ_dir}/")

    def _record(self, left: Path, right_dir: Path, disp: Path | None, noc: Path | None) -> PairRecord:
        right = right_dir / left.name
        if not right.is_file():
            raise DataError(f"{left}: no matching right image; expected {right}.")
        return PairRecord(
            name=left.stem,
            left=left,
            right=right,
            disp=disp,
            nonocc=noc if noc is not None and noc.is_file() else None,
        )

    def read_nonocc(self, path: Path) -> np.ndarray:
        """KITTI's non-occluded ground truth is a disparity PNG; its valid pixels are the nonocc mask."""
        return read_kitti_disparity(path)[1]


class Kitti2012Dataset(_KittiDataset):
    """KITTI 2012 stereo: colored_0 / colored_1, ground truth disp_occ (nonocc from disp_noc)."""

    kind: ClassVar[str] = "kitti2012"
    left_dir, right_dir, occ_dir, noc_dir = "colored_0", "colored_1", "disp_occ", "disp_noc"


class Kitti2015Dataset(_KittiDataset):
    """KITTI 2015 stereo: image_2 / image_3, ground truth disp_occ_0 (nonocc from disp_noc_0)."""

    kind: ClassVar[str] = "kitti2015"
    left_dir, right_dir, occ_dir, noc_dir = "image_2", "image_3", "disp_occ_0", "disp_noc_0"


def _is_fsd_view_root(d: Path) -> bool:
    return (d / "left" / "rgb").is_dir()


class FSDDataset(FileStereoDataset):
    """FoundationStereo synthetic dataset (FSD): <scene>/.../left/rgb/NNNN.jpg, right/rgb/NNNN.jpg and
    left/disparity/NNNN.png, the disparity packed in RGB as (R*255*255 + G*255 + B) / 1000 (0 = invalid).
    """

    kind: ClassVar[str] = "fsd"

    def __init__(
        self, root: str | os.PathLike, transform: Transform | None = None, seed: int = 0, max_depth: int = 6
    ) -> None:
        super().__init__(root, transform=transform, seed=seed)
        records = []
        for view_root in _walk_dirs(self.root, max_depth, prune=_is_fsd_view_root):
            if not _is_fsd_view_root(view_root):
                continue
            for left in _images_in(view_root / "left" / "rgb"):
                right = view_root / "right" / "rgb" / left.name
                if not right.is_file():
                    raise DataError(f"{left}: no matching right image; expected {right}.")
                disp = view_root / "left" / "disparity" / (left.stem + ".png")
                if not disp.is_file():
                    raise DataError(f"{left}: no ground-truth disparity; expected {disp}.")
                name = f"{_rel_name(view_root, self.root)}/{left.stem}"
                records.append(PairRecord(name=name, left=left, right=right, disp=disp))
        self._set_records(records, "left/rgb/*.jpg, right/rgb/*.jpg and left/disparity/*.png")

    def read_disparity(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """FSD disparity PNGs are RGB-packed, not KITTI 16-bit."""
        return read_fsd_disparity(path)


class StereoPairFolder(FileStereoDataset):
    """Unlabeled pairs: left/ and right/ with matching names, or *_left.* / *_right.* files, or im0/im1 per
    sub-folder (the first layout found wins). Used for distillation, where the teacher provides the labels.
    """

    kind: ClassVar[str] = "pairs"
    expected: ClassVar[str] = (
        "left/ and right/ folders with matching file names, *_left.png / *_right.png files, "
        "or sub-folders holding im0.png and im1.png"
    )

    def __init__(self, root: str | os.PathLike, transform: Transform | None = None, seed: int = 0) -> None:
        super().__init__(root, transform=transform, seed=seed)
        self._set_records(self._discover(), self.expected)

    def _discover(self) -> list[PairRecord]:
        left_dir, right_dir = self.root / "left", self.root / "right"
        if left_dir.is_dir():
            lefts = _images_in(left_dir)
            if not lefts:
                raise DataError(f"{left_dir}: holds no images (expected {', '.join(IMAGE_EXTENSIONS)}).")
            if not right_dir.is_dir():
                raise DataError(f"{left_dir}: has no right-image folder; expected {right_dir}.")
            return [self._pair(left, right_dir / left.name, left.stem) for left in lefts]
        suffixed = [p for p in _images_in(self.root) if p.stem.endswith("_left")]
        if suffixed:
            records = []
            for left in suffixed:
                stem = left.stem[: -len("_left")]
                right = _find_image(self.root, f"{stem}_right") or left.with_name(f"{stem}_right{left.suffix}")
                records.append(self._pair(left, right, stem))
            return records
        records = []
        for scene in _scene_dirs(self.root):
            left = _find_image(scene, "im0")
            assert left is not None
            right = _find_image(scene, "im1") or scene / f"im1{left.suffix}"
            records.append(self._pair(left, right, _rel_name(scene, self.root)))
        return records

    @staticmethod
    def _pair(left: Path, right: Path, name: str) -> PairRecord:
        if not right.is_file():
            raise DataError(f"{left}: no matching right image; expected {right}.")
        return PairRecord(name=name, left=left, right=right)


# ------------------------------------------------------------------------------------------------ detection

DATASET_KINDS: dict[str, type[FileStereoDataset]] = {
    "kitti2015": Kitti2015Dataset,
    "kitti2012": Kitti2012Dataset,
    "sceneflow": SceneFlowDataset,
    "fsd": FSDDataset,
    "middlebury": MiddleburyDataset,
    "eth3d": ETH3DDataset,
    "pairs": StereoPairFolder,
}


def _detect_kitti(root: Path, cls: type[_KittiDataset]) -> bool:
    return any(
        (base / cls.left_dir).is_dir() and (base / cls.right_dir).is_dir()
        for base in (root, root / "training", root / "testing")
    )


def _detect_sceneflow(root: Path) -> bool:
    for name in ("frames_cleanpass", "frames_finalpass"):
        if any((d.parent / "disparity").is_dir() for d in _find_named_dirs(root, name, 2)):
            return True
    return False


def _detect_fsd(root: Path) -> bool:
    return any(
        _is_fsd_view_root(d) and (d / "right" / "rgb").is_dir()
        for d in _walk_dirs(root, 4, prune=_is_fsd_view_root)
    )


def _detect_middlebury(root: Path) -> bool:
    return any(
        any((scene / n).is_file() for n in MiddleburyDataset.gt_names) for scene in _scene_dirs(root)
    )


def _detect_pairs(root: Path) -> bool:
    if (root / "left").is_dir() and (root / "right").is_dir():
        return True
    if any(p.stem.endswith("_left") for p in _images_in(root)):
        return True
    return bool(_scene_dirs(root))


# Order matters: the more specific layouts first; ETH3D reads exactly like Middlebury, so auto picks
# middlebury for both (pass kind="eth3d" to name it).
_DETECTORS: list[tuple[str, Callable[[Path], bool], str]] = [
    ("kitti2015", lambda r: _detect_kitti(r, Kitti2015Dataset), "image_2/ and image_3/ (in root or training/)"),
    ("kitti2012", lambda r: _detect_kitti(r, Kitti2012Dataset), "colored_0/ and colored_1/ (in root or training/)"),
    ("sceneflow", _detect_sceneflow, "frames_cleanpass/ or frames_finalpass/ beside disparity/"),
    ("fsd", _detect_fsd, "left/rgb/ and right/rgb/ folders (FoundationStereo FSD)"),
    ("middlebury", _detect_middlebury, "scene folders with im0.png, im1.png and disp0GT.pfm or disp0.pfm"),
    ("pairs", _detect_pairs, StereoPairFolder.expected),
]


def layout_names() -> list[str]:
    """The dataset layouts ``kind='auto'`` detects, in the order it tries them."""
    return [name for name, _, _ in _DETECTORS]


def open_dataset(
    path: str | os.PathLike, kind: str = "auto", transform: Transform | None = None, seed: int = 0, **kwargs: Any
) -> FileStereoDataset:
    """Open a stereo dataset folder; kind='auto' detects the layout (see DATASET_KINDS for the names)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found.")
    if kind != "auto":
        if kind not in DATASET_KINDS:
            raise ConfigError(f"unknown dataset kind {kind!r}; expected 'auto' or one of {sorted(DATASET_KINDS)}.")
        return DATASET_KINDS[kind](root, transform=transform, seed=seed, **kwargs)
    for name, detect, _ in _DETECTORS:
        if detect(root):
            return DATASET_KINDS[name](root, transform=transform, seed=seed, **kwargs)
    tried = "\n".join(f"  - {name}: {expected}" for name, _, expected in _DETECTORS)
    raise DataError(
        f"{root}: no known stereo dataset layout found. Tried:\n{tried}\n"
        "Point at the dataset's root folder, or pass kind= explicitly to see what that reader expects."
    )

