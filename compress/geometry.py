"""Stereo geometry for deployment: camera intrinsics files, depth from disparity, point clouds, binary PLY.

Conventions follow the official FoundationStereo demo: the intrinsics file holds the 3x3 camera matrix
flattened row by row on its first line and the baseline in metres on its second; depth = fx * baseline /
(disparity + doffs), doffs being the two cameras' principal-point offset in x (Middlebury's calib.txt; 0 for
the demo's rectified pairs); points are in the left camera's OpenCV frame (x right, y down, z forward), in
metres. Depth maps use 0 for "no depth" (no positive disparity).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from compress.atomic import atomic_write
from compress.data.io import write_pfm
from compress.errors import DataError

PathLike = str | os.PathLike

# 16-bit depth PNGs store millimetres; 0 marks pixels without depth.
DEPTH_PNG_SCALE = 1000.0
DEPTH_FORMATS = (".npy", ".pfm", ".png")
_PLY_VERTEX = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])


@dataclass(frozen=True)
class StereoCalibration:
    """The left camera's 3x3 matrix K (pixels) and the stereo baseline (metres)."""

    K: np.ndarray
    baseline: float

    @property
    def fx(self) -> float:
        """Horizontal focal length in pixels."""
        return float(self.K[0, 0])

    def scaled(self, scale: float) -> StereoCalibration:
        """The calibration of images resized by ``scale`` (focal lengths and principal point scale with them)."""
        if not scale > 0:
            raise DataError(f"--scale {scale}: must be positive")
        K = self.K.copy()
        K[:2] *= scale
        return StereoCalibration(K, self.baseline)


def read_intrinsics(path: PathLike) -> StereoCalibration:
    """Read an intrinsics file in the official demo format: 9 numbers (K row by row), then the baseline."""
    path = Path(path)
    expected = "line 1: the 3x3 camera matrix as 9 numbers row by row; line 2: the baseline in metres"
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except FileNotFoundError:
        raise DataError(f"{path}: intrinsics file not found; expected {expected}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read intrinsics file: {exc}") from None
    if len(lines) < 2:
        raise DataError(f"{path}: has {len(lines)} non-empty line(s); expected {expected}")
    try:
        values = [float(v) for v in lines[0].split()]
        baseline = float(lines[1].split()[0])
    except ValueError as exc:
        raise DataError(f"{path}: {exc}; expected {expected}") from None
    if len(values) != 9:
        raise DataError(f"{path}:1: has {len(values)} numbers; expected {expected}")
    K = np.array(values, dtype=np.float64).reshape(3, 3)
    if not (K[0, 0] > 0 and K[1, 1] > 0 and np.isfinite(K).all()):
        raise DataError(f"{path}:1: focal lengths fx={K[0, 0]:g}, fy={K[1, 1]:g} must be positive")
    if not (baseline > 0 and np.isfinite(baseline)):
        raise DataError(f"{path}:2: baseline {baseline:g} must be a positive distance in metres")
    return StereoCalibration(K, baseline)


def depth_from_disparity(
    disp: np.ndarray, fx: float, baseline: float, doffs: float = 0.0, *, invalid: float = 0.0
) -> np.ndarray:
    """Depth (float32, in the baseline's unit) = fx * baseline / (disparity + doffs); ``invalid`` where not positive."""
    # Computed in float64 and rounded once, so depth maps and PLY points match across callers bit for bit.
    # invalid=0.0 is what depth files and point clouds mean by "no depth"; a ratio-based check may want inf.
    d = np.asarray(disp, dtype=np.float64) + doffs
    ok = np.isfinite(d) & (d > 0)
    depth = np.full(d.shape, invalid, dtype=np.float64)
    depth[ok] = fx * baseline / d[ok]
    return depth.astype(np.float32)


def invisible_mask(disp: np.ndarray) -> np.ndarray:
    """True where a left pixel's match (x - disparity) falls outside the right image, as the official demo drops."""
    d = np.asarray(disp)
    xs = np.arange(d.shape[-1], dtype=np.float64)
    return (xs - d) < 0


def point_cloud(
    depth: np.ndarray,
    K: np.ndarray,
    colors: np.ndarray | None = None,
    zfar: float = np.inf,
    keep: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Back-project a depth map: (N x 3 float32 points, N x 3 uint8 colours) for 0 < z <= zfar (and ``keep``)."""
    z = np.asarray(depth, dtype=np.float64)
    if z.ndim != 2:
        raise DataError(f"depth has shape {z.shape}; expected H x W")
    h, w = z.shape
    mask = np.isfinite(z) & (z > 0) & (z <= zfar)
    if keep is not None:
        mask &= np.asarray(keep, dtype=bool)
    vs, us = np.nonzero(mask)
    zs = z[vs, us]
    xs = (us - K[0, 2]) * zs / K[0, 0]
    ys = (vs - K[1, 2]) * zs / K[1, 1]
    points = np.stack([xs, ys, zs], axis=1).astype(np.float32)
    if colors is None:
        rgb = np.full((len(points), 3), 255, dtype=np.uint8)
    else:
        c = np.asarray(colors)
        if c.shape[:2] != (h, w):
            raise DataError(f"colour image is {c.shape[0]}x{c.shape[1]} but the depth map is {h}x{w} (height x width)")
        rgb = np.ascontiguousarray(c[vs, us, :3], dtype=np.uint8)
    return points, rgb


def write_ply(path: PathLike, points: np.ndarray, colors: np.ndarray | None = None) -> Path:
    """Write points (N x 3) with optional uint8 RGB colours as a binary little-endian PLY (atomically)."""
    pts = np.asarray(points, dtype=np.float32)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise DataError(f"{path}: points have shape {pts.shape}; expected N x 3")
    vertices = np.empty(len(pts), dtype=_PLY_VERTEX)
    vertices["x"], vertices["y"], vertices["z"] = pts[:, 0], pts[:, 1], pts[:, 2]
    rgb = np.full((len(pts), 3), 255, dtype=np.uint8) if colors is None else np.asarray(colors, dtype=np.uint8)
    if rgb.shape != (len(pts), 3):
        raise DataError(f"{path}: colours have shape {rgb.shape}; expected {(len(pts), 3)}")
    vertices["red"], vertices["green"], vertices["blue"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment written by ffsc\n"
        f"element vertex {len(pts)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n"
    ).encode("ascii")

    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(vertices.tobytes())

    return atomic_write(path, _write)


def read_ply(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a PLY that :func:`write_ply` wrote: (N x 3 float32 points, N x 3 uint8 colours)."""
    path = Path(path)
    data = path.read_bytes()
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply\n") or end < 0:
        raise DataError(f"{path}: not a PLY file (no 'ply' magic or no end_header)")
    header = data[:end].decode("ascii").splitlines()
    if "format binary_little_endian 1.0" not in header:
        raise DataError(f"{path}: not a binary little-endian PLY")
    count = next((int(ln.split()[2]) for ln in header if ln.startswith("element vertex")), None)
    if count is None:
        raise DataError(f"{path}: PLY header has no vertex element")
    body = data[end + len(b"end_header\n"):]
    if len(body) != count * _PLY_VERTEX.itemsize:
        raise DataError(f"{path}: {len(body)} bytes of vertex data for {count} vertices of "
                        f"{_PLY_VERTEX.itemsize} bytes; the file is truncated or has other properties")
    v = np.frombuffer(body, dtype=_PLY_VERTEX)
    points = np.stack([v["x"], v["y"], v["z"]], axis=1).astype(np.float32)
    colors = np.stack([v["red"], v["green"], v["blue"]], axis=1).astype(np.uint8)
    return points, colors


def write_depth(path: PathLike, depth: np.ndarray) -> Path:
    """Write metres as .npy / .pfm (float32) or a 16-bit millimetre .png (0 = no depth or beyond 65.535 m)."""
    path = Path(path)
    d = np.asarray(depth, dtype=np.float32)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return atomic_write(path, lambda tmp: np.save(tmp, d, allow_pickle=False))
    if suffix == ".pfm":
        return write_pfm(path, d)
    if suffix == ".png":
        mm = np.rint(np.where(np.isfinite(d) & (d > 0), d, 0.0).astype(np.float64) * DEPTH_PNG_SCALE)
        raw = np.where(mm <= 65535, mm, 0).astype(np.uint16)
        img = Image.fromarray(raw)
        return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
    raise DataError(f"{path}: unknown depth format {suffix!r}; expected one of {', '.join(DEPTH_FORMATS)}")
