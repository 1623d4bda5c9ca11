"""Reading and writing the file formats stereo datasets use: PFM, RGB images, 16-bit and RGB-coded disparity PNGs.

Every reader raises DataError naming the file; every writer goes through a temporary file in the same
folder and a rename, so an interrupted write never leaves a truncated file under the final name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from compress.atomic import atomic_write
from compress.errors import DataError

__all__ = [
    "atomic_write",
    "decode_fsd_disparity",
    "encode_fsd_disparity",
    "read_calib",
    "read_fsd_disparity",
    "read_image",
    "read_kitti_disparity",
    "read_mask",
    "read_pfm",
    "write_calib",
    "write_disparity_png",
    "write_fsd_disparity",
    "write_image",
    "write_kitti_disparity",
    "write_mask",
    "write_pfm",
]

PathLike = str | os.PathLike

# KITTI stores disparity * 256 in a uint16, so this is the largest value a KITTI PNG can hold.
KITTI_MAX_DISP = 65535.0 / 256.0
# FoundationStereo's FSD disparity PNGs pack round(disp * 1000) into R, G, B digits of base 255.
FSD_SCALE = 1000.0
_FSD_BASE = 255


# ----------------------------------------------------------------------------------------------------- PFM


def _read_header_tokens(f: Any, path: Path, count: int) -> list[bytes]:
    """Read whitespace-separated header tokens line by line until `count` are collected."""
    tokens: list[bytes] = []
    while len(tokens) < count:
        line = f.readline()
        if not line:
            raise DataError(f"{path}: PFM header ends early; expected width, height and scale lines.")
        if len(line) > 256:
            raise DataError(f"{path}: PFM header line is not text; the file is not a valid PFM.")
        tokens.extend(line.split())
    return tokens


def read_pfm(path: PathLike) -> np.ndarray:
    """Read a PFM file into a float32 array, HxW for 'Pf' (grey) or HxWx3 for 'PF' (colour)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: PFM file not found.")
    try:
        with open(path, "rb") as f:
            magic = f.readline().strip()
            if magic not in (b"PF", b"Pf"):
                shown = magic[:16].decode("ascii", errors="replace")
                raise DataError(
                    f"{path}: not a PFM file: header starts with {shown!r}, expected 'PF' (colour) or 'Pf' (grey)."
                )
            channels = 3 if magic == b"PF" else 1
            tokens = _read_header_tokens(f, path, 3)
            if len(tokens) != 3:
                raise DataError(f"{path}: malformed PFM header {tokens!r}; expected 'width height' then 'scale'.")
            try:
                width, height, scale = int(tokens[0]), int(tokens[1]), float(tokens[2])
            except ValueError as exc:
                raise DataError(f"{path}: malformed PFM header {tokens!r}: {exc}.") from None
            if width <= 0 or height <= 0:
                raise DataError(f"{path}: PFM size {width}x{height} is not positive.")
            if scale == 0.0 or not np.isfinite(scale):
                raise DataError(f"{path}: PFM scale {scale} must be non-zero (its sign gives the byte order).")
            # A negative scale means little-endian data; the magnitude is unused by stereo datasets.
            dtype = np.dtype("<f4" if scale < 0 else ">f4")
            expected = width * height * channels
            payload = f.read(expected * 4)
    except OSError as exc:
        raise DataError(f"{path}: cannot read PFM file: {exc}.") from None
    if len(payload) != expected * 4:
        raise DataError(
            f"{path}: PFM data truncated: {len(payload)} bytes for a {width}x{height}x{channels} image "
            f"({expected * 4} expected)."
        )
    data = np.frombuffer(payload, dtype=dtype)
    shape = (height, width, 3) if channels == 3 else (height, width)
    # PFM stores rows bottom-to-top.
    return np.ascontiguousarray(np.flipud(data.reshape(shape)).astype(np.float32))


def write_pfm(path: PathLike, array: np.ndarray, little_endian: bool = True) -> Path:
    """Write an HxW (grey) or HxWx3 (colour) array as PFM; returns the path."""
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise DataError(f"{path}: cannot write PFM from an array of shape {arr.shape}; expected HxW or HxWx3.")
    height, width = arr.shape[:2]
    magic = "PF" if arr.ndim == 3 else "Pf"
    dtype = np.dtype("<f4" if little_endian else ">f4")
    header = f"{magic}\n{width} {height}\n{-1.0 if little_endian else 1.0}\n".encode("ascii")
    payload = np.ascontiguousarray(np.flipud(arr)).astype(dtype).tobytes()

    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(payload)

    return atomic_write(path, _write)


# -------------------------------------------------------------------------------------------------- images


def _open_image(path: Path, what: str) -> Image.Image:
    if not path.is_file():
        raise DataError(f"{path}: {what} not found.")
    try:
        img = Image.open(path)
        img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read {what}: {exc}.") from None
    return img


def read_image(path: PathLike) -> np.ndarray:
    """Read an image as uint8 HxWx3 RGB: grey is repeated over 3 channels, alpha is dropped."""
    path = Path(path)
    img = _open_image(path, "image")
    if img.mode.startswith("I"):
        # 16-bit grey (some stereo cameras); map the full 16-bit range onto 8 bits.
        arr = np.asarray(img).astype(np.float64)
        grey = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    if img.mode == "F":
        raise DataError(f"{path}: is a floating-point image; expected an 8-bit RGB or grey image.")
    # np.array copies: arrays backed by PIL buffers are read-only, and torch warns on those.
    return np.array(img.convert("RGB"), dtype=np.uint8)


def write_image(path: PathLike, image: np.ndarray) -> Path:
    """Write a uint8 HxWx3 (or HxW grey) image; the format follows the file suffix."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise DataError(f"{path}: expected a uint8 HxW or HxWx3 image, got {arr.dtype} {arr.shape}.")
    img = Image.fromarray(np.ascontiguousarray(arr))
    return atomic_write(path, lambda tmp: img.save(tmp))


def read_mask(path: PathLike, true_value: int = 255) -> np.ndarray:
    """Read a grey mask image as bool HxW, True where the pixel equals `true_value` (Middlebury: 255)."""
    path = Path(path)
    img = _open_image(path, "mask image")
    if img.mode not in ("1", "L", "P", "RGB", "RGBA", "LA"):
        raise DataError(f"{path}: mask image has mode {img.mode}; expected an 8-bit grey PNG.")
    arr = np.asarray(img.convert("L"))
    return arr == true_value


def write_mask(path: PathLike, mask: np.ndarray, true_value: int = 255, false_value: int = 0) -> Path:
    """Write a bool mask as an 8-bit grey PNG (true_value where True)."""
    m = np.asarray(mask, dtype=bool)
    arr = np.where(m, np.uint8(true_value), np.uint8(false_value)).astype(np.uint8)
    return write_image(path, arr)


# ------------------------------------------------------------------------------------------ disparity PNGs


def read_kitti_disparity(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a KITTI 16-bit disparity PNG: returns (disparity float32 = value / 256, valid = value > 0)."""
    path = Path(path)
    img = _open_image(path, "KITTI disparity PNG")
    if img.mode not in ("I;16", "I;16B", "I;16L", "I"):
        raise DataError(
            f"{path}: KITTI disparity must be a 16-bit single-channel PNG (value = disparity * 256, "
            f"0 = invalid); found image mode {img.mode!r}."
        )
    raw = np.asarray(img).astype(np.int64)
    if raw.ndim != 2 or raw.min(initial=0) < 0 or raw.max(initial=0) > 65535:
        raise DataError(f"{path}: KITTI disparity values are outside the 16-bit range.")
    valid = raw > 0
    disp = (raw.astype(np.float32) / 256.0).astype(np.float32)
    return disp, valid


def write_kitti_disparity(path: PathLike, disp: np.ndarray, valid: np.ndarray | None = None) -> Path:
    """Write disparity as a KITTI 16-bit PNG (round(d * 256); invalid = 0; valid pixels stored as >= 1)."""
    d = np.asarray(disp, dtype=np.float64)
    if d.ndim != 2:
        raise DataError(f"{path}: expected an HxW disparity, got shape {d.shape}.")
    finite = np.isfinite(d)
    v = finite & (d > 0) if valid is None else np.asarray(valid, dtype=bool) & finite
    if v.any() and float(d[v].min()) < 0:
        raise DataError(f"{path}: negative disparity {float(d[v].min()):.3f} cannot be stored in a KITTI PNG.")
    if v.any() and float(d[v].max()) > KITTI_MAX_DISP:
        raise DataError(
            f"{path}: disparity {float(d[v].max()):.3f} exceeds the KITTI PNG limit {KITTI_MAX_DISP:.3f}; "
            "store it as PFM instead."
        )
    raw = np.zeros(d.shape, dtype=np.uint16)
    # A valid zero disparity would read back as invalid, so valid pixels keep at least the smallest step.
    raw[v] = np.clip(np.rint(d[v] * 256.0), 1, 65535).astype(np.uint16)
    img = Image.fromarray(raw)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def decode_fsd_disparity(rgb: np.ndarray, scale: float = FSD_SCALE) -> np.ndarray:
    """Decode FoundationStereo (FSD) RGB-packed disparity: (R*255*255 + G*255 + B) / scale."""
    arr = np.asarray(rgb).astype(np.float64)
    value = arr[..., 0] * (_FSD_BASE * _FSD_BASE) + arr[..., 1] * _FSD_BASE + arr[..., 2]
    return (value / scale).astype(np.float32)


def encode_fsd_disparity(disp: np.ndarray, scale: float = FSD_SCALE) -> np.ndarray:
    """Encode disparity into FSD's RGB packing (inverse of decode_fsd_disparity); returns uint8 HxWx3."""
    d = np.asarray(disp, dtype=np.float64)
    value = np.rint(np.where(np.isfinite(d) & (d > 0), d, 0.0) * scale).astype(np.int64)
    limit = 255 * _FSD_BASE * _FSD_BASE + (_FSD_BASE - 1) * _FSD_BASE + (_FSD_BASE - 1)
    if value.max(initial=0) > limit:
        raise DataError(f"disparity {float(d.max()):.3f} is too large for the FSD RGB encoding.")
    r = value // (_FSD_BASE * _FSD_BASE)
    rem = value - r * _FSD_BASE * _FSD_BASE
    g = rem // _FSD_BASE
    b = rem - g * _FSD_BASE
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def read_fsd_disparity(path: PathLike, scale: float = FSD_SCALE) -> tuple[np.ndarray, np.ndarray]:
    """Read an FSD disparity PNG: returns (disparity float32, valid = disparity > 0)."""
    path = Path(path)
    img = _open_image(path, "FSD disparity PNG")
    if img.mode != "RGB":
        raise DataError(
            f"{path}: FSD disparity must be an 8-bit RGB PNG (disparity = (R*255*255 + G*255 + B) / 1000); "
            f"found image mode {img.mode!r}."
        )
    disp = decode_fsd_disparity(np.asarray(img), scale)
    return disp, disp > 0


def write_fsd_disparity(path: PathLike, disp: np.ndarray, scale: float = FSD_SCALE) -> Path:
    """Write disparity in FSD's RGB-packed PNG encoding (0 = invalid)."""
    rgb = encode_fsd_disparity(disp, scale)
    img = Image.fromarray(rgb)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def write_disparity_png(
    path: PathLike,
    disp: np.ndarray,
    valid: np.ndarray | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Path:
    """Write a disparity map as a turbo colour-mapped RGB PNG for viewing (invalid pixels black)."""
    import matplotlib  # deferred: only visualisation needs it and the import is slow

    d = np.asarray(disp, dtype=np.float64)
    if d.ndim == 3 and d.shape[0] == 1:
        d = d[0]
    if d.ndim != 2:
        raise DataError(f"{path}: expected an HxW disparity, got shape {d.shape}.")
    v = np.isfinite(d) if valid is None else np.asarray(valid, dtype=bool) & np.isfinite(d)
    lo = float(d[v].min()) if vmin is None and v.any() else float(vmin or 0.0)
    hi = float(d[v].max()) if vmax is None and v.any() else float(vmax if vmax is not None else lo + 1.0)
    norm = np.clip((np.where(v, d, lo) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    rgb = (matplotlib.colormaps["turbo"](norm)[..., :3] * 255.0).round().astype(np.uint8)
    rgb[~v] = 0
    return write_image(path, rgb)


# ------------------------------------------------------------------------------------------------ calib.txt

_INT_KEYS = {"width", "height", "ndisp", "isint"}
_MATRIX_RE = re.compile(r"^\[(.*)\]$")


def read_calib(path: PathLike) -> dict[str, Any]:
    """Parse a Middlebury/ETH3D calib.txt (key=value lines; cam0/cam1 as 3x3 matrices) into a dict."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: calibration file not found.")
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read calibration file: {exc}.") from None
    calib: dict[str, Any] = {}
    for lineno, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise DataError(f"{path}:{lineno}: expected 'key=value', found {raw_line!r}.")
        try:
            match = _MATRIX_RE.match(value)
            if match:
                rows = [r.split() for r in match.group(1).split(";")]
                calib[key] = np.array(rows, dtype=np.float64)
            elif key in _INT_KEYS:
                calib[key] = int(float(value))
            else:
                calib[key] = float(value)
        except ValueError:
            raise DataError(f"{path}:{lineno}: cannot parse value of {key!r}: {value!r}.") from None
    for cam in ("cam0", "cam1"):
        if cam in calib and calib[cam].shape != (3, 3):
            raise DataError(f"{path}: {cam} has shape {calib[cam].shape}; expected a 3x3 matrix.")
    return calib


def _format_calib_value(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return "[" + "; ".join(" ".join(f"{x:g}" for x in row) for row in value) + "]"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{float(value):.10g}"


def write_calib(path: PathLike, calib: dict[str, Any]) -> Path:
    """Write a calib dict in Middlebury's key=value format (matrices as [a b c; d e f; g h i])."""
    text = "".join(f"{k}={_format_calib_value(v)}\n" for k, v in calib.items())
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="ascii"))
