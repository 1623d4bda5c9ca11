"""Inference on stereo pairs and folders of pairs: reading frames, disparity -> depth -> point cloud, outputs.

Images are read by the dataset readers (:func:`compress.data.io.read_image`: grey becomes RGB, alpha is
dropped); a folder of pairs may be any layout :func:`compress.data.readers.open_dataset` knows, or a left
and a right folder with matching file names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from compress.atomic import atomic_write
from compress.data.io import read_image, write_disparity_png, write_pfm
from compress.data.readers import IMAGE_EXTENSIONS, open_dataset
from compress.errors import DataError
from compress.geometry import (
    DEPTH_FORMATS,
    StereoCalibration,
    depth_from_disparity,
    invisible_mask,
    point_cloud,
    write_depth,
    write_ply,
)

MAP_FORMATS = DEPTH_FORMATS  # .npy, .pfm, .png (a turbo colour map for disparity, 16-bit millimetres for depth)
# Every model pads its input to a multiple of 32 (InputPadder, check_image_size); a view smaller than one such
# cell is mostly replicated border and the disparity of it is noise, so it is refused rather than run.
MIN_IMAGE_SIDE = 32


@dataclass(frozen=True)
class Frame:
    """One stereo pair to run: a name for its outputs and the two image files."""

    name: str
    left: Path
    right: Path


def frames_from_folders(left_dir: str | os.PathLike, right_dir: str | os.PathLike) -> list[Frame]:
    """Pairs from a left and a right folder, matched by file name without extension (a missing match stays,
    to be reported as a bad frame)."""
    left_dir, right_dir = Path(left_dir), Path(right_dir)
    if not right_dir.is_dir():
        raise DataError(f"--left {left_dir} is a folder but --right {right_dir} is not; pass two folders")

    def images(folder: Path) -> dict[str, Path]:
        return {p.stem: p for p in sorted(folder.iterdir())
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")}

    lefts, rights = images(left_dir), images(right_dir)
    if not lefts:
        raise DataError(f"{left_dir}: holds no images (expected {', '.join(IMAGE_EXTENSIONS)})")
    return [Frame(stem, path, rights.get(stem, right_dir / path.name)) for stem, path in lefts.items()]


def frames_from_dataset(root: str | os.PathLike) -> list[Frame]:
    """Pairs of a dataset folder in any layout the readers detect (KITTI, Middlebury, SceneFlow, left/right...)."""
    dataset = open_dataset(root)
    return [Frame(rec.name, rec.left, rec.right) for rec in dataset.records]


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(height, width) of an image resized by ``scale``, as resize_image rounds it."""
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_image(image: np.ndarray, scale: float) -> np.ndarray:
    """An RGB image resized by ``scale`` (bilinear, like the official demo's cv2.resize)."""
    h, w = scaled_size(*image.shape[:2], scale)
    return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8)


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file, from its header (the pixels are not decoded)."""
    if not path.is_file():
        raise DataError(f"{path}: image not found.")
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image: {exc}.") from None
    return height, width


def check_pair(frame: Frame, scale: float = 1.0) -> tuple[int, int]:
    """(height, width) the model will get for a pair, from the file headers; DataError when the two views differ
    in size or the (scaled) pair is smaller than MIN_IMAGE_SIDE."""
    (lh, lw), (rh, rw) = image_size(frame.left), image_size(frame.right)
    if (lh, lw) != (rh, rw):
        raise DataError(f"left image {frame.left} is {lh}x{lw} but right image {frame.right} is {rh}x{rw} (height x "
                        "width); a rectified stereo pair has equal sizes")
    height, width = scaled_size(lh, lw, scale)
    if min(height, width) < MIN_IMAGE_SIDE:
        scaled = f" after --scale {scale:g}" if scale != 1.0 else ""
        raise DataError(f"the pair {frame.left}, {frame.right} is {height}x{width} (height x width){scaled}; the "
                        f"models need at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} (one cell of their 32-pixel stride)")
    return height, width


def read_stereo_pair(left: str | os.PathLike, right: str | os.PathLike, scale: float = 1.0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Both views as uint8 H x W x 3 RGB (grey converted as the dataset readers do), resized by ``scale``."""
    left_img, right_img = read_image(left), read_image(right)
    if left_img.shape != right_img.shape:
        raise DataError(
            f"left image {left} is {left_img.shape[0]}x{left_img.shape[1]} but right image {right} is "
            f"{right_img.shape[0]}x{right_img.shape[1]} (height x width); a rectified stereo pair has equal sizes")
    if scale != 1.0:
        left_img, right_img = resize_image(left_img, scale), resize_image(right_img, scale)
    return left_img, right_img


@dataclass
class FrameResult:
    """What one pair produced: disparity (pixels), and with a calibration depth (metres) and a coloured cloud."""

    disparity: np.ndarray
    depth: np.ndarray | None = None
    points: np.ndarray | None = None
    colors: np.ndarray | None = None


def disparity_to_geometry(
    disp: np.ndarray,
    left: np.ndarray,
    calib: StereoCalibration | None = None,
    fx_baseline: tuple[float, float] | None = None,
    zfar: float = np.inf,
    remove_invisible: bool = False,
) -> FrameResult:
    """Depth from the calibration (or fx and baseline alone) and, with a full calibration, the point cloud."""
    result = FrameResult(disp)
    if calib is None and fx_baseline is None:
        return result
    fx, baseline = (calib.fx, calib.baseline) if calib is not None else fx_baseline
    depth = depth_from_disparity(disp, fx, baseline)
    if remove_invisible:
        depth[invisible_mask(disp)] = 0.0
    result.depth = depth
    if calib is not None:
        result.points, result.colors = point_cloud(depth, calib.K, left, zfar=zfar)
    return result


def parse_formats(text: str) -> tuple[str, ...]:
    """``npy,png`` -> ('.npy', '.png'), checked against the map formats."""
    formats = tuple(dict.fromkeys("." + f.strip().lower().lstrip(".") for f in text.split(",") if f.strip()))
    bad = [f for f in formats if f not in MAP_FORMATS]
    if bad or not formats:
        raise DataError(f"--formats {text!r}: expected a comma-separated list of {', '.join(MAP_FORMATS)}")
    return formats


@dataclass
class OutputPlan:
    """Where one frame's outputs go."""

    disparity: list[Path] = field(default_factory=list)
    depth: list[Path] = field(default_factory=list)
    cloud: Path | None = None

    def all(self) -> list[Path]:
        """Every output path of the frame."""
        return [*self.disparity, *self.depth, *([self.cloud] if self.cloud else [])]


def plan_outputs(out: Path, name: str | None, formats: tuple[str, ...], depth: bool, cloud: bool) -> OutputPlan:
    """Output paths: ``out`` itself when it names a map file (one pair), else files in ``out`` (or ``out/name``)."""
    if name is None and out.suffix.lower() in MAP_FORMATS:
        # The single-file form: disparity at out, depth and cloud beside it.
        depth_suffix = out.suffix if out.suffix.lower() != ".png" else ".npy"
        return OutputPlan([out], [out.with_name(f"{out.stem}_depth{depth_suffix}")] if depth else [],
                          out.with_name(f"{out.stem}_cloud.ply") if cloud else None)
    if name is None and out.suffix and not out.is_dir() and out.suffix.lower() != ".ply":
        raise DataError(f"--out {out}: unknown disparity format {out.suffix!r}; expected {', '.join(MAP_FORMATS)} "
                        "or a folder")
    if out.suffix.lower() == ".ply" or (name is not None and out.suffix.lower() in MAP_FORMATS):
        raise DataError(f"--out {out}: expected a folder (one sub-folder per frame for a folder of pairs) or, "
                        f"for one pair, a disparity file ({', '.join(MAP_FORMATS)})")
    folder = out / name if name else out
    return OutputPlan([folder / f"disparity{f}" for f in formats],
                      [folder / f"depth{f}" for f in formats] if depth else [],
                      folder / "cloud.ply" if cloud else None)


def check_outputs_writable(paths: list[Path]) -> None:
    """Fail before any inference when an output cannot be written (a file in the way, no permission)."""
    # compress.preflight loads compress.backends and with it onnx (about 1.5 s): kept out of ffsc --help
    from compress.preflight import check_writable

    # Probe one file per folder, not the folder itself: an existing file where the folder should be
    # (--out afile/disp.npy) passes as a writable file but fails mkdir only after inference.
    first_in_folder: dict[Path, Path] = {}
    for path in paths:
        first_in_folder.setdefault(path.parent, path)
    for path in first_in_folder.values():
        check_writable(path, key="--out")
    for path in paths:
        if path.is_dir():
            raise DataError(f"cannot write {path}: a folder of that name is in the way")


def write_disparity(path: Path, disp: np.ndarray) -> Path:
    """Write a disparity map as .npy, .pfm or a colour-mapped .png, by extension."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return atomic_write(path, lambda tmp: np.save(tmp, disp.astype(np.float32), allow_pickle=False))
    if suffix == ".pfm":
        return write_pfm(path, disp.astype(np.float32))
    if suffix == ".png":
        return write_disparity_png(path, disp)
    raise DataError(f"--out {path}: unknown disparity format {suffix!r}; expected {', '.join(MAP_FORMATS)}")


def write_outputs(result: FrameResult, plan: OutputPlan) -> list[Path]:
    """Write what the plan asks for and the result has; returns the files written."""
    written = [write_disparity(p, result.disparity) for p in plan.disparity]
    if result.depth is not None:
        written += [write_depth(p, result.depth) for p in plan.depth]
    if plan.cloud is not None and result.points is not None:
        written.append(write_ply(plan.cloud, result.points, result.colors))
    return written
