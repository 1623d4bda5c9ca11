"""Scoring on real stereo pairs with ground truth: does a model give sensible disparity on a photograph?

The built-in pair is Middlebury 2014 "Motorcycle" as scikit-image ships it (``skimage.data.stereo_motorcycle``:
500x741 RGB with its ground-truth disparity, ``inf`` where there is none); folders of labelled pairs in any layout
``compress.data.readers.open_dataset`` detects can be scored too. A pair may be resized (bilinear, both sides
rounded to multiples of 32, the width following the aspect ratio); the ground truth is then resized by
nearest-neighbour sampling and multiplied by the width's scale factor.

Scored pixels: ground truth present and the match inside the right image (x - d >= 0). The left band where
x < d shows scene the right camera never saw: no stereo method can match it (Middlebury's non-occluded masks
leave it out too); ``score`` reports EPE with that band included beside. Metrics are ``compress.metrics``: EPE
(px), bad-1/2/3 (% of pixels with error above 1/2/3 px) and KITTI D1 (% above 3 px and 5%).

OpenCV's SGBM (``cv2.StereoSGBM_create``, MODE_SGBM_3WAY): numDisparities the smallest multiple of 16 above the
ground truth's largest disparity at that size, blockSize 5, P1 = 8*3*5^2, P2 = 32*3*5^2, uniquenessRatio 10,
disp12MaxDiff 1, speckle window 100 with range 2, on the RGB images. It leaves holes (negative values); ``score``
reports it twice: on its own valid pixels, and with holes counted as bad pixels (its EPE then stays on the valid
ones: filling holes with some disparity would score the filling, not SGBM). Models never leave holes.

scikit-image and OpenCV come with the ``real`` extra (``pip install -e ".[real]"``) and are imported only when
used: without them the scoring that needs them is skipped with one message, never an exception.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from PIL import Image

from compress.data.readers import open_dataset
from compress.errors import ConfigError, DataError, MissingDependencyError
from compress.metrics import compute_metrics
from teacher import infer

__all__ = [
    "MOTORCYCLE",
    "SCORE_KEYS",
    "RealPair",
    "RealPairsConfig",
    "fit_size",
    "load_motorcycle",
    "load_real_pairs",
    "predict_disparity",
    "require_optional",
    "resize_pair",
    "retention",
    "score",
    "score_model",
    "score_sgbm",
    "sgbm",
    "sgbm_num_disparities",
    "visible_mask",
]

MOTORCYCLE = "motorcycle"
EXTRA = 'the "real" extra (pip install -e ".[real]")'
METRICS = ("epe", "bp1", "bp2", "bp3", "d1")
SCORE_KEYS = (*METRICS, "seconds")


def require_optional(module: str, package: str) -> ModuleType:
    """Import an optional dependency of real-pair scoring, or raise MissingDependencyError naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(f"real-pair scoring needs {package} ({e}); install {EXTRA}") from e


def load_motorcycle() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Middlebury Motorcycle from scikit-image: left, right (uint8 RGB) and left disparity (inf = no GT)."""
    left, right, disp = require_optional("skimage.data", "scikit-image").stereo_motorcycle()
    return np.ascontiguousarray(left), np.ascontiguousarray(right), disp.astype(np.float32)


def fit_size(h0: int, w0: int, height: int) -> tuple[int, int]:
    """(height, width) for a target height: aspect ratio kept, both rounded to multiples of 32."""
    h = max(32, round(height / 32) * 32)
    return h, max(32, round(w0 * h / h0 / 32) * 32)


def resize_pair(left: np.ndarray, right: np.ndarray, gt: np.ndarray, height: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pair resized bilinearly; the GT sampled at the nearest pixel and scaled by the width's factor."""
    h0, w0 = gt.shape
    h, w = fit_size(h0, w0, height)
    left, right = (np.asarray(Image.fromarray(im).resize((w, h), Image.Resampling.BILINEAR)) for im in (left, right))
    rows = np.minimum(((np.arange(h) + 0.5) * h0 / h).astype(int), h0 - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * w0 / w).astype(int), w0 - 1)
    return left, right, gt[rows[:, None], cols[None, :]] * np.float32(w / w0)


def sgbm_num_disparities(gt: np.ndarray) -> int:
    """The smallest multiple of 16 above the largest ground-truth disparity."""
    return (int(np.nanmax(np.where(np.isfinite(gt), gt, np.nan))) // 16 + 1) * 16


def sgbm(left: np.ndarray, right: np.ndarray, num_disparities: int, block_size: int = 5) -> np.ndarray:
    """OpenCV SGBM disparity (float32 px) of an RGB pair; negative where SGBM found no match."""
    cv2 = require_optional("cv2", "opencv-python-headless")
    matcher = cv2.StereoSGBM_create(
        minDisparity=0, numDisparities=num_disparities, blockSize=block_size, P1=8 * 3 * block_size**2,
        P2=32 * 3 * block_size**2, disp12MaxDiff=1, uniquenessRatio=10, speckleWindowSize=100, speckleRange=2,
        mode=cv2.STEREO_SGBM_MODE_SGBM_3WAY)
    return matcher.compute(left, right).astype(np.float32) / 16.0  # fixed point, 4 fractional bits


def visible_mask(gt: np.ndarray) -> np.ndarray:
    """Pixels with ground truth whose match lies inside the right image (x - d >= 0)."""
    cols = np.arange(gt.shape[1], dtype=np.float32)[None, :]
    with np.errstate(invalid="ignore"):
        return np.isfinite(gt) & (cols - gt >= 0)


def score(pred: np.ndarray, gt: np.ndarray, holes: np.ndarray | None = None) -> dict[str, Any]:
    """Metrics over the visible GT pixels; with ``holes``, also on the valid pixels only and holes-as-bad."""
    mask = visible_mask(gt)
    out: dict[str, Any] = {"pixels": int(mask.sum()), "with_band": compute_metrics(pred, gt)}
    if holes is None:
        return {**out, "density": 100.0, "metrics": compute_metrics(pred, gt, mask)}
    valid_only = compute_metrics(pred, gt, mask & ~holes)
    # compress.metrics counts a non-finite prediction as bad at every threshold: that is what a hole is.
    as_bad = compute_metrics(np.where(holes, np.inf, pred), gt, mask)
    as_bad["epe"] = valid_only["epe"]
    band = compute_metrics(np.where(holes, np.inf, pred), gt)
    band["epe"] = compute_metrics(pred, gt, ~holes)["epe"]
    return {**out, "with_band": band, "density": 100.0 * float((mask & ~holes).sum()) / max(1, out["pixels"]),
            "metrics": as_bad, "valid_only": valid_only}


@dataclass
class RealPairsConfig:
    """Which real pairs every run scores its teacher and students on (the recipe's ``real_pairs:`` section)."""

    enabled: bool = True
    pairs: list[str] = field(default_factory=lambda: [MOTORCYCLE])
    """'motorcycle' (scikit-image's Middlebury pair) or folders of labelled pairs in any layout the readers know."""
    height: int | None = None
    """None: native resolution; otherwise resized to about this height (multiples of 32, aspect kept)."""
    sgbm: bool = True
    """Score OpenCV's SGBM beside the models when OpenCV is installed."""
    limit: int | None = None
    """At most this many pairs per folder."""

    def __post_init__(self) -> None:
        for key in ("enabled", "sgbm"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"real_pairs.{key}: got {getattr(self, key)!r}, expected true or false")
        if isinstance(self.pairs, str):
            raise ConfigError(f"real_pairs.pairs: got the string {self.pairs!r}, expected a list such as "
                              f"[{self.pairs}]")
        self.pairs = list(self.pairs)
        bad = [p for p in self.pairs if not isinstance(p, str) or not p.strip()]
        if bad:
            raise ConfigError(f"real_pairs.pairs: {bad} are not pair names; expected {MOTORCYCLE!r} or folder paths")
        repeated = sorted({p for p in self.pairs if self.pairs.count(p) > 1})
        if repeated:
            raise ConfigError(f"real_pairs.pairs: {repeated} listed more than once; list each pair once")
        if self.enabled and not self.pairs:
            raise ConfigError("real_pairs.pairs is empty; name at least one pair, or set real_pairs.enabled: false")
        for key, least in (("height", 32), ("limit", 1)):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise ConfigError(f"real_pairs.{key}: got {value!r}, expected an integer >= {least} or null")


@dataclass
class RealPair:
    """One rectified pair: left/right uint8 HxWx3 RGB, gt float32 HxW left disparity (inf = no ground truth)."""

    name: str
    left: np.ndarray
    right: np.ndarray
    gt: np.ndarray

    def __post_init__(self) -> None:
        for view in ("left", "right"):
            im = getattr(self, view)
            if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
                got = f"{im.dtype} {im.shape}" if isinstance(im, np.ndarray) else type(im).__name__
                raise DataError(f"real pair {self.name!r}: {view} must be a uint8 HxWx3 array, got {got}")
            setattr(self, view, np.ascontiguousarray(im))
        gt = np.asarray(self.gt, dtype=np.float32)
        if self.right.shape != self.left.shape or gt.shape != self.left.shape[:2]:
            raise DataError(f"real pair {self.name!r}: left {self.left.shape}, right {self.right.shape} and gt "
                            f"{gt.shape} do not match")
        # One spelling of "no ground truth" (inf) so that score()'s masks need not know the others (nan, <= 0).
        with np.errstate(invalid="ignore"):
            self.gt = np.where(np.isfinite(gt) & (gt > 0), gt, np.float32(np.inf)).astype(np.float32)


def _module_missing(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return True
    return False


def _folder_pairs(entry: str, limit: int | None) -> list[RealPair]:
    folder = Path(entry)
    try:
        ds = open_dataset(folder, kind="auto")
    except DataError as e:
        raise ConfigError(f"real_pairs.pairs: {entry}: {e}") from e
    prefix = folder.resolve().name
    pairs = []
    for i in range(len(ds) if limit is None else min(limit, len(ds))):
        sample = ds.load(i)
        if sample.disp is None:
            raise ConfigError(f"real_pairs.pairs: {entry}: sample {sample.name or i!r} has no ground-truth "
                              "disparity; real-pair scoring needs labelled pairs (point at a folder with ground truth)")
        gt = np.where(sample.valid, sample.disp, np.float32(np.inf))
        pairs.append(RealPair(f"{prefix}/{sample.name or i}", sample.left, sample.right, gt))
    return pairs


def load_real_pairs(cfg: RealPairsConfig, say: Callable[[str], None] = print) -> list[RealPair]:
    """The pairs ``cfg`` names, resized to ``cfg.height``; Motorcycle is skipped (said once) without scikit-image."""
    if not cfg.enabled:
        return []
    pairs: list[RealPair] = []
    for entry in cfg.pairs:
        if entry == MOTORCYCLE:
            if _module_missing("skimage.data"):
                say(f"real-pair scoring of Middlebury Motorcycle is off: scikit-image is not installed; "
                    f"enable it with {EXTRA}")
                continue
            pairs.append(RealPair(MOTORCYCLE, *load_motorcycle()))
        else:
            pairs += _folder_pairs(entry, cfg.limit)
    names = [p.name for p in pairs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"real_pairs.pairs: two folders give the pairs {repeated} the same names; "
                          "give the folders different names")
    if cfg.height is not None:
        pairs = [RealPair(p.name, *resize_pair(p.left, p.right, p.gt, cfg.height)) for p in pairs]
    return pairs


def predict_disparity(model: torch.nn.Module, pair: RealPair, iters: int | None,
                      device: str | torch.device) -> np.ndarray:
    """The model's HxW float32 disparity of a pair (moves the model to ``device``; eval mode for the call)."""
    model.to(device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            disp = infer(model, pair.left, pair.right, iters=iters)
    finally:
        model.train(training)
    out = disp.detach().to("cpu", torch.float32).numpy().reshape(disp.shape[-2:])
    if out.shape != pair.gt.shape:
        raise DataError(f"real pair {pair.name!r}: the model returned {out.shape}, expected {pair.gt.shape}")
    return out


def _with_mean(scores: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    if not scores:
        return {}
    rows = list(scores.values())
    return {**scores, "mean": {k: float(np.mean([r[k] for r in rows])) for k in SCORE_KEYS}}


def score_model(model: torch.nn.Module, pairs: list[RealPair], iters: int | None = None,
                device: str | torch.device = "cpu") -> dict[str, dict[str, float]]:
    """EPE, bad-1/2/3, D1 and seconds of a model per pair (visible GT pixels), plus their "mean" over pairs."""
    scores: dict[str, dict[str, float]] = {}
    for pair in pairs:
        start = time.perf_counter()
        pred = predict_disparity(model, pair, iters, device)
        seconds = time.perf_counter() - start
        m = score(pred, pair.gt)["metrics"]
        scores[pair.name] = {**{k: float(m[k]) for k in METRICS}, "seconds": seconds}
    return _with_mean(scores)


def score_sgbm(pairs: list[RealPair], threads: int | None = None,
               say: Callable[[str], None] = print) -> dict[str, dict[str, float]] | None:
    """score_model's table for OpenCV SGBM (holes counted as bad pixels); None, said once, without OpenCV."""
    if not pairs:
        return {}
    try:
        cv2 = require_optional("cv2", "opencv-python-headless")
    except MissingDependencyError:
        say(f"real-pair scoring of OpenCV SGBM is off: opencv-python-headless is not installed; enable it with {EXTRA}")
        return None
    saved = cv2.getNumThreads()
    if threads is not None:
        cv2.setNumThreads(threads)
    scores: dict[str, dict[str, float]] = {}
    try:
        for pair in pairs:
            start = time.perf_counter()
            disp = sgbm(pair.left, pair.right, sgbm_num_disparities(pair.gt))
            seconds = time.perf_counter() - start
            m = score(disp, pair.gt, holes=disp < 0)["metrics"]
            scores[pair.name] = {**{k: float(m[k]) for k in METRICS}, "seconds": seconds}
    finally:
        cv2.setNumThreads(saved)
    return _with_mean(scores)


def retention(student_bp2: float, teacher_bp2: float) -> float:
    """Student BP-2 over teacher BP-2 (1.0 when both are 0, inf when only the teacher's is 0, nan from nan)."""
    if np.isnan(student_bp2) or np.isnan(teacher_bp2):
        return float("nan")
    if teacher_bp2 == 0:
        return 1.0 if student_bp2 == 0 else float("inf")
    return float(student_bp2) / float(teacher_bp2)
