"""Procedural stereo pairs with exact ground truth: a slanted textured plane plus textured foreground shapes.

Each layer (background plane, then objects) is a textured surface defined over the left view with its own
disparity. The left view shows, per pixel, the nearest layer. The right view is the same layers
forward-warped by their per-pixel disparity with a z-buffer (nearer wins), so occlusions and
disocclusions are correct and every right pixel comes from the scene, not from inpainting.

Rendering shifts are whole pixels and the ground truth is that same whole-pixel shift: a left pixel that is
visible in both views (nonocc) then satisfies left[y, x] == right[y, x - disp[y, x]] exactly. A slanted plane
therefore has a 1-px staircase disparity (exact for the pair; a sub-pixel disparity cannot make two pixel
grids agree exactly). Where a slant squeezes a surface in the right view, two left pixels land on one right
pixel and only the nearer one is marked nonocc; where it stretches, the one-pixel gap is filled from the same
surface (its two neighbours' mean).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compress.data.augment import resize_image
from compress.data.io import read_image, write_calib, write_image, write_pfm
from compress.data.sample import StereoDataset, StereoSample, Transform
from compress.errors import ConfigError
from compress.terminal import progress_bar

__all__ = [
    "SHAPES",
    "SKIMAGE_TEXTURES",
    "SyntheticConfig",
    "SyntheticStereoDataset",
    "generate_sample",
    "synthetic_calib",
    "write_synthetic_dataset",
]

SHAPES = ("rectangle", "ellipse", "polygon")


@dataclass
class SyntheticConfig:
    """Parameters of the procedural stereo generator; sample i of a config is a pure function of (seed, i)."""

    height: int = 64
    width: int = 128
    max_disp: float = 32.0
    """Largest disparity (px) any pixel may have; the background stays in the lower half of the range."""
    num_objects: int = 4
    seed: int = 0
    min_disp: float = 1.0
    """Smallest disparity (px); >= 1 so that every pixel is valid ground truth (0 would read as invalid)."""
    focal_px: float = 100.0
    """Focal length in pixels (depth = focal_px * baseline_m / disparity)."""
    baseline_m: float = 0.1
    """Camera baseline in metres (written to calib.txt in millimetres, as Middlebury does)."""
    max_slope: float = 0.2
    """Upper bound on the background's disparity gradient (px of disparity per px), per axis."""
    object_slope: float = 0.05
    """Upper bound on each object's disparity gradient (px per px)."""
    object_size: tuple[float, float] = (0.15, 0.4)
    """Range of an object's radius as a fraction of min(height, width)."""
    shapes: tuple[str, ...] = field(default=SHAPES)
    noise_amplitude: float = 0.5
    """Strength of the multi-scale value noise in the textures (0..1 colour units)."""
    stripe_amplitude: float = 0.25
    """Strength of the sinusoidal stripes in the textures (0..1 colour units)."""
    texture_dir: str | None = None
    """Folder of photographs (png/jpg), or 'skimage' (scikit-image's bundled photographs); each layer is textured
    with a random crop of one with probability ``photo_prob`` (natural image statistics: smooth regions, edges,
    repeats), else procedurally."""
    photo_prob: float = 0.5
    """Probability that a layer's texture is a photograph, when ``texture_dir`` is set."""
    max_disp_low: float | None = None
    """When set, each sample's largest disparity is drawn log-uniformly from [max_disp_low, max_disp], so one
    dataset covers near and far scenes; None = every sample spans up to ``max_disp``."""

    def __post_init__(self) -> None:
        self.shapes = tuple(self.shapes)
        self.object_size = (float(self.object_size[0]), float(self.object_size[1]))
        if self.height < 8 or self.width < 8:
            raise ConfigError(f"synthetic image size {self.height}x{self.width} is too small; use at least 8x8.")
        if self.min_disp < 1:
            raise ConfigError(f"min_disp={self.min_disp} must be >= 1 (disparity 0 means 'invalid').")
        if math.floor(self.max_disp) < math.ceil(self.min_disp) + 2:
            raise ConfigError(
                f"max_disp={self.max_disp} leaves no room above min_disp={self.min_disp}; "
                "use max_disp >= min_disp + 3 so background and objects get separate depths."
            )
        if self.max_disp >= self.width:
            raise ConfigError(f"max_disp={self.max_disp} must be smaller than the width {self.width}.")
        if self.num_objects < 0:
            raise ConfigError(f"num_objects={self.num_objects} must be >= 0.")
        # Slopes below 0.5 keep neighbouring shifts within one pixel of each other, so gaps are 1 px wide.
        for key in ("max_slope", "object_slope"):
            if not 0 <= getattr(self, key) < 0.5:
                raise ConfigError(f"{key}={getattr(self, key)} must be in [0, 0.5).")
        lo, hi = self.object_size
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"object_size={self.object_size} must satisfy 0 < low <= high <= 1.")
        unknown = set(self.shapes) - set(SHAPES)
        if not self.shapes or unknown:
            raise ConfigError(f"shapes={self.shapes} must be a non-empty subset of {SHAPES}.")
        if self.focal_px <= 0 or self.baseline_m <= 0:
            raise ConfigError("focal_px and baseline_m must be positive.")
        if not 0.0 <= self.photo_prob <= 1.0:
            raise ConfigError(f"photo_prob={self.photo_prob} must be a probability in [0, 1].")
        if self.texture_dir is not None:
            _photos(str(self.texture_dir))  # a missing or empty folder fails here, not in a DataLoader worker
        if self.max_disp_low is not None and not self.min_disp + 3 <= self.max_disp_low <= self.max_disp:
            raise ConfigError(f"max_disp_low={self.max_disp_low} must lie in [min_disp + 3, max_disp] = "
                              f"[{self.min_disp + 3}, {self.max_disp}] (or be null).")


@dataclass
class _Layer:
    mask: np.ndarray  # bool (h, wc): where the surface exists, in left-view canvas coordinates
    disp: np.ndarray  # float64 (h, wc): continuous disparity, used for depth ordering
    shift: np.ndarray  # int64 (h, wc): whole-pixel disparity used to render (and reported as ground truth)
    tex: np.ndarray  # uint8 (h, wc, 3)


def _upsample_noise(grid: np.ndarray, cell: int, h: int, w: int) -> np.ndarray:
    """Bilinearly interpolate a coarse random grid with `cell`-pixel spacing onto an h x w pixel grid."""
    gy, gx = np.arange(h) / cell, np.arange(w) / cell
    y0, x0 = np.floor(gy).astype(np.int64), np.floor(gx).astype(np.int64)
    fy, fx = (gy - y0)[:, None, None], (gx - x0)[None, :, None]
    # Separable: rows first, then columns, so each step indexes along one axis only.
    rows = grid[y0] * (1 - fy) + grid[y0 + 1] * fy
    return rows[:, x0] * (1 - fx) + rows[:, x0 + 1] * fx


def _texture(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, cfg: SyntheticConfig) -> np.ndarray:
    """A random colour texture: base colour + multi-scale noise + oriented stripes + per-pixel grain."""
    h, wc = ys.shape
    tex = np.broadcast_to(rng.uniform(0.25, 0.75, size=3), (h, wc, 3)).copy()
    for cell, weight in ((16, 0.4), (8, 0.3), (4, 0.2), (2, 0.1)):
        grid = rng.uniform(-1.0, 1.0, size=(h // cell + 2, wc // cell + 2, 3))
        tex += cfg.noise_amplitude * weight * _upsample_noise(grid, cell, h, wc)
    # Stripes mostly across the epipolar direction (|angle| <= 60 deg from vertical) keep matching well posed.
    angle = rng.uniform(-math.pi / 3, math.pi / 3)
    period = rng.uniform(3.0, 12.0)
    phase = rng.uniform(0.0, 2 * math.pi)
    stripes = np.sin(2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period + phase)
    tex += cfg.stripe_amplitude * stripes[..., None] * rng.uniform(-1.0, 1.0, size=3)
    # Per-pixel grain makes every pixel distinctive, so no two positions on a row look alike.
    tex += 0.3 * cfg.noise_amplitude * rng.uniform(-1.0, 1.0, size=(h, wc, 1))
    return np.rint(np.clip(tex, 0.0, 1.0) * 255.0).astype(np.uint8)


PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

SKIMAGE = "skimage"
"""``texture_dir`` value naming scikit-image's bundled photographs (:data:`SKIMAGE_TEXTURES`) instead of a folder."""

SKIMAGE_TEXTURES = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "moon", "page",
                    "rocket", "text")
"""scikit-image's bundled photographs used as textures: natural scenes and surfaces (not the motorcycle, which is
the held-out real stereo pair; not the synthetic or microscopy images)."""


def skimage_photos() -> tuple[np.ndarray, ...]:
    """scikit-image's photographs in :data:`SKIMAGE_TEXTURES` order, as HxWx3 uint8 (grey ones repeated)."""
    try:
        import skimage.data  # optional (the "real" extra): only textures named 'skimage' need it
    except ImportError:
        raise ConfigError("texture_dir 'skimage' needs scikit-image (pip install -e \".[real]\"), or name a folder "
                          "of photographs, or null for procedural textures") from None
    out = []
    for name in SKIMAGE_TEXTURES:
        img = np.asarray(getattr(skimage.data, name)())
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        out.append(np.ascontiguousarray(img[..., :3]))
    return tuple(out)


@functools.lru_cache(maxsize=4)
def _photos(folder: str) -> tuple[np.ndarray, ...]:
    """Every photograph in ``folder`` (sorted by name, so a texture's choice is reproducible), as uint8 RGB;
    ``skimage``: scikit-image's bundled ones."""
    if folder == SKIMAGE:
        return skimage_photos()
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"texture_dir {folder!r} is not a folder; expected a folder of photographs "
                          f"({', '.join(PHOTO_SUFFIXES)})")
    files = sorted(f for f in root.iterdir() if f.suffix.lower() in PHOTO_SUFFIXES)
    if not files:
        raise ConfigError(f"texture_dir {folder!r} holds no photographs ({', '.join(PHOTO_SUFFIXES)})")
    return tuple(read_image(f) for f in files)


def _photo_texture(rng: np.random.Generator, photos: tuple[np.ndarray, ...], h: int, wc: int) -> np.ndarray:
    """A random crop of a random photograph, rescaled by 0.5-2x (at least to the canvas) and maybe mirrored."""
    photo = photos[int(rng.integers(len(photos)))]
    ph, pw = photo.shape[:2]
    scale = max(math.exp(rng.uniform(math.log(0.5), math.log(2.0))), h / ph, wc / pw)
    sh, sw = max(h, math.ceil(ph * scale)), max(wc, math.ceil(pw * scale))
    top, left = int(rng.integers(sh - h + 1)), int(rng.integers(sw - wc + 1))
    flip = rng.uniform() < 0.5
    # Crop in the photo's own pixels first, so only the canvas-sized part is resampled.
    y0, y1 = int(top / scale), min(ph, math.ceil((top + h) / scale) + 1)
    x0, x1 = int(left / scale), min(pw, math.ceil((left + wc) / scale) + 1)
    tex = resize_image(photo[y0:y1, x0:x1], h, wc)
    if flip:
        tex = tex[:, ::-1]
    # Sensor grain: photographs have flat regions; two grey levels of noise keep them realistic, not blank.
    grain = rng.integers(-2, 3, size=(h, wc, 1))
    return np.clip(tex.astype(np.int16) + grain, 0, 255).astype(np.uint8)


def _layer_texture(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, cfg: SyntheticConfig) -> np.ndarray:
    """The texture of one layer: a photograph crop (when the config names photographs) or a procedural one."""
    if cfg.texture_dir is not None and rng.uniform() < cfg.photo_prob:
        return _photo_texture(rng, _photos(str(cfg.texture_dir)), *ys.shape)
    return _texture(rng, ys, xs, cfg)


def _polygon_mask(vertices: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test for every pixel centre."""
    inside = np.zeros(ys.shape, dtype=bool)
    n = len(vertices)
    for i in range(n):
        x1, y1 = vertices[i]
        x2, y2 = vertices[i - 1]
        if y1 == y2:
            continue
        crosses = (y1 > ys) != (y2 > ys)
        x_at = x1 + (x2 - x1) * (ys - y1) / (y2 - y1)
        inside ^= crosses & (xs < x_at)
    return inside


def _shape_mask(
    rng: np.random.Generator, shape: str, cx: float, cy: float, radius: float, ys: np.ndarray, xs: np.ndarray
) -> tuple[np.ndarray, float]:
    """Mask of a randomly oriented shape centred at (cx, cy); also returns its bounding radius."""
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    rx, ry = radius * math.sqrt(aspect), radius / math.sqrt(aspect)
    theta = rng.uniform(0.0, math.pi)
    cos_t, sin_t = math.cos(theta), math.sin(theta)
    u = (xs - cx) * cos_t + (ys - cy) * sin_t
    v = -(xs - cx) * sin_t + (ys - cy) * cos_t
    if shape == "ellipse":
        return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0, max(rx, ry)
    if shape == "rectangle":
        return (np.abs(u) <= rx) & (np.abs(v) <= ry), math.hypot(rx, ry)
    n = int(rng.integers(3, 9))
    phis = np.sort(rng.uniform(0.0, 2 * math.pi, size=n))
    rho = rng.uniform(0.5, 1.0, size=n)
    pu, pv = rx * rho * np.cos(phis), ry * rho * np.sin(phis)
    vertices = np.stack([cx + pu * cos_t - pv * sin_t, cy + pu * sin_t + pv * cos_t], axis=1)
    return _polygon_mask(vertices, ys, xs), max(rx, ry)


def _whole_pixels(disp: np.ndarray, cfg: SyntheticConfig) -> np.ndarray:
    return np.clip(np.rint(disp), math.ceil(cfg.min_disp), math.floor(cfg.max_disp)).astype(np.int64)


def _build_layers(rng: np.random.Generator, cfg: SyntheticConfig, ys: np.ndarray, xs: np.ndarray) -> list[_Layer]:
    h, wc = ys.shape
    lo, hi = float(cfg.min_disp), float(cfg.max_disp)
    bg_hi = lo + 0.45 * (hi - lo)
    fg_lo = lo + 0.5 * (hi - lo)

    # Background: plane a + b*x + c*y, slopes bounded so the whole canvas stays within [lo, bg_hi].
    span = bg_hi - lo
    b = rng.uniform(-1.0, 1.0) * min(cfg.max_slope, 0.5 * span / wc)
    c = rng.uniform(-1.0, 1.0) * min(cfg.max_slope, 0.5 * span / h)
    plane = b * xs + c * ys
    a = rng.uniform(lo - plane.min(), bg_hi - plane.max())
    bg_disp = a + plane
    bg_tex = _layer_texture(rng, ys, xs, cfg)
    layers = [_Layer(np.ones((h, wc), dtype=bool), bg_disp, _whole_pixels(bg_disp, cfg), bg_tex)]

    width = cfg.width
    base = min(cfg.height, cfg.width)
    for _ in range(cfg.num_objects):
        shape = str(rng.choice(cfg.shapes))
        cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * h
        radius = rng.uniform(*cfg.object_size) * base
        mask, extent = _shape_mask(rng, shape, cx, cy, radius, ys, xs)
        bo, co = rng.uniform(-1.0, 1.0, size=2) * cfg.object_slope
        # Largest deviation from the centre disparity inside the shape; shrink the slant if it cannot fit.
        dev = (abs(bo) + abs(co)) * extent
        if dev > 0.45 * (hi - fg_lo):
            shrink = 0.45 * (hi - fg_lo) / dev
            bo, co, dev = bo * shrink, co * shrink, dev * shrink
        d0 = rng.uniform(fg_lo + dev, hi - dev)
        disp = d0 + bo * (xs - cx) + co * (ys - cy)
        layers.append(_Layer(mask, disp, _whole_pixels(disp, cfg), _layer_texture(rng, ys, xs, cfg)))
    return layers


def _render_right(layers: list[_Layer], h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Forward-warp every layer into the right view with a z-buffer; returns (image, source id per pixel).

    Source ids are layer * (h * wc) + y * wc + x of the left-canvas pixel that won, or -1 for gap fillers.
    """
    wc = layers[0].mask.shape[1]
    targets, keys, colours, sources = [], [], [], []
    for i, layer in enumerate(layers):
        yy, xx = np.nonzero(layer.mask)
        xr = xx - layer.shift[yy, xx]
        inside = (xr >= 0) & (xr < w)
        targets.append(yy[inside] * w + xr[inside])
        keys.append(layer.disp[yy, xx][inside])
        colours.append(layer.tex[yy, xx][inside])
        sources.append(i * h * wc + yy[inside] * wc + xx[inside])

        # Where the shift drops by one between neighbours the surface stretches and leaves a 1-px gap.
        gap = layer.mask[:, :-1] & layer.mask[:, 1:] & (layer.shift[:, :-1] - layer.shift[:, 1:] == 1)
        gy, gx = np.nonzero(gap)
        gxr = gx - layer.shift[gy, gx] + 1
        inside = (gxr >= 0) & (gxr < w)
        gy, gx, gxr = gy[inside], gx[inside], gxr[inside]
        targets.append(gy * w + gxr)
        keys.append(0.5 * (layer.disp[gy, gx] + layer.disp[gy, gx + 1]))
        pair_sum = layer.tex[gy, gx].astype(np.int64) + layer.tex[gy, gx + 1]
        colours.append(((pair_sum + 1) // 2).astype(np.uint8))
        sources.append(np.full(len(gy), -1, dtype=np.int64))

    target = np.concatenate(targets)
    key = np.concatenate(keys)
    # Sort by target pixel, then by disparity: the last entry of each target group is the nearest surface.
    order = np.lexsort((key, target))
    sorted_target = target[order]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = sorted_target[1:] != sorted_target[:-1]
    winners = order[last]
    if len(winners) != h * w:
        raise RuntimeError(f"synthetic renderer left {h * w - len(winners)} right-view pixels empty")
    image = np.zeros((h * w, 3), dtype=np.uint8)
    source = np.full(h * w, -2, dtype=np.int64)
    image[target[winners]] = np.concatenate(colours)[winners]
    source[target[winners]] = np.concatenate(sources)[winners]
    return image.reshape(h, w, 3), source.reshape(h, w)


def synthetic_calib(cfg: SyntheticConfig, disp: np.ndarray | None = None) -> dict[str, Any]:
    """Middlebury-style calibration of the synthetic rig (baseline in millimetres, like Middlebury)."""
    k = np.array(
        [[cfg.focal_px, 0.0, (cfg.width - 1) / 2.0], [0.0, cfg.focal_px, (cfg.height - 1) / 2.0], [0.0, 0.0, 1.0]]
    )
    calib: dict[str, Any] = {
        "cam0": k,
        "cam1": k.copy(),
        "doffs": 0.0,
        "baseline": cfg.baseline_m * 1000.0,
        "width": cfg.width,
        "height": cfg.height,
        "ndisp": math.floor(cfg.max_disp) + 1,
        "isint": 0,
    }
    if disp is not None:
        calib["vmin"] = float(disp.min())
        calib["vmax"] = float(disp.max())
    return calib


def generate_sample(config: SyntheticConfig, index: int = 0) -> StereoSample:
    """Render synthetic pair `index` of `config` (deterministic in (config.seed, index))."""
    rng = np.random.default_rng([int(config.seed), int(index)])
    h, w = config.height, config.width
    wc = w + math.ceil(config.max_disp) + 2  # right-view pixels near the right border come from beyond w
    ys, xs = np.mgrid[0:h, 0:wc].astype(np.float64)
    if config.max_disp_low is not None:
        # Drawn before anything else, and only when asked for, so configs without it render as they always did.
        top = math.exp(rng.uniform(math.log(config.max_disp_low), math.log(config.max_disp)))
        config = dataclasses.replace(config, max_disp=top, max_disp_low=None)
    layers = _build_layers(rng, config, ys, xs)

    keys = np.stack([np.where(layer.mask, layer.disp, -np.inf) for layer in layers])
    winner = keys[:, :, :w].argmax(axis=0)
    rows, cols = np.mgrid[0:h, 0:w]
    left = np.stack([layer.tex[:, :w] for layer in layers])[winner, rows, cols]
    shift = np.stack([layer.shift[:, :w] for layer in layers])[winner, rows, cols]

    right, source = _render_right(layers, h, w)
    xr = cols - shift
    expected = winner * (h * wc) + rows * wc + cols
    nonocc = (xr >= 0) & (source[rows, np.clip(xr, 0, w - 1)] == expected)

    disp = shift.astype(np.float32)
    return StereoSample(
        left=np.ascontiguousarray(left),
        right=right,
        disp=disp,
        valid=np.ones((h, w), dtype=bool),
        name=f"synthetic_s{config.seed}_{index:05d}",
        nonocc=nonocc,
        calib=synthetic_calib(config, disp),
    )


class SyntheticStereoDataset(StereoDataset):
    """`n` procedurally generated pairs with exact ground truth (generated on access, nothing on disk)."""

    kind = "synthetic"

    def __init__(
        self, n: int, config: SyntheticConfig | None = None, transform: Transform | None = None, seed: int = 0
    ) -> None:
        super().__init__(transform=transform, seed=seed)
        if n < 1:
            raise ConfigError(f"a synthetic dataset needs n >= 1 samples, got {n}.")
        self.n = int(n)
        self.config = config if config is not None else SyntheticConfig()

    def __len__(self) -> int:
        return self.n

    def load(self, index: int) -> StereoSample:
        """Generate sample `index`."""
        return generate_sample(self.config, self._resolve(index))


def write_synthetic_dataset(
    out_dir: str | os.PathLike, n: int, config: SyntheticConfig | None = None, progress: bool = True
) -> list[Path]:
    """Write `n` pairs as Middlebury scene folders (im0.png, im1.png, disp0GT.pfm, mask0nocc.png, calib.txt).

    Each scene is written to a hidden temporary folder and renamed into place, so a scene folder is either
    complete or absent. mask0nocc.png uses Middlebury's codes: 255 visible in both views, 128 occluded.
    Returns the scene folders.
    """
    cfg = config if config is not None else SyntheticConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scenes = []
    for i in progress_bar(range(n), desc="writing synthetic stereo", disable=not progress):
        sample = generate_sample(cfg, i)
        scene = out / f"scene_{i:04d}"
        tmp = out / f".scene_{i:04d}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        write_image(tmp / "im0.png", sample.left)
        write_image(tmp / "im1.png", sample.right)
        write_pfm(tmp / "disp0GT.pfm", sample.disp)
        assert sample.nonocc is not None
        write_image(tmp / "mask0nocc.png", np.where(sample.nonocc, 255, 128).astype(np.uint8))
        write_calib(tmp / "calib.txt", sample.calib or {})
        if scene.exists():
            shutil.rmtree(scene)
        os.replace(tmp, scene)
        scenes.append(scene)
    return scenes
