"""Augmentation keeps the views and the ground truth aligned (checked on exact synthetic pairs)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from compress.data.augment import (
    AugmentConfig,
    StereoAugmentor,
    augment,
    colour_jitter,
    crop_sample,
    random_crop,
    scale_sample,
    vflip_sample,
)
from compress.data.readers import StereoSample
from compress.data.synthetic import SyntheticConfig, SyntheticStereoDataset, generate_sample
from compress.errors import ConfigError, DataError

SYN = SyntheticConfig(height=64, width=128, max_disp=24.0, num_objects=4, seed=11)
NO_JITTER = dict(jitter_prob=0.0)


def _match_rate(sample: StereoSample, tol: int = 0) -> float:
    """Share of nonocc pixels whose colour equals (within tol) the right view's at x - d."""
    h, w = sample.disp.shape
    ys, xs = np.nonzero(sample.nonocc)
    xr = xs - np.rint(sample.disp[ys, xs]).astype(np.int64)
    assert (xr >= 0).all()
    diff = np.abs(sample.left[ys, xs].astype(int) - sample.right[ys, xr].astype(int)).max(axis=1)
    return float((diff <= tol).mean())


def test_config_validation():
    with pytest.raises(ConfigError, match="multiples of 32"):
        AugmentConfig(crop_size=(48, 64))
    with pytest.raises(ConfigError, match="probability"):
        AugmentConfig(scale_prob=1.5)
    with pytest.raises(ConfigError, match="gamma"):
        AugmentConfig(gamma=(0.0, 1.0))
    assert AugmentConfig(crop_size=[32, 64]).crop_size == (32, 64)  # lists from YAML become tuples


def test_random_crop_keeps_correspondence():
    sample = generate_sample(SYN, 0)
    assert _match_rate(sample) == 1.0
    rng = np.random.default_rng(0)
    corners = set()
    for _ in range(5):
        out = random_crop(sample, (32, 64), rng)
        assert out.left.shape == (32, 64, 3) and out.disp.shape == (32, 64)
        assert out.nonocc.sum() > 0.3 * out.nonocc.size
        assert _match_rate(out) == 1.0
        # The same window of the original: find where the crop came from.
        hits = [(t, x) for t in range(33) for x in range(65) if np.array_equal(sample.left[t:t + 32, x:x + 64],
                                                                               out.left)]
        assert len(hits) == 1
        t, x = hits[0]
        corners.add(hits[0])
        np.testing.assert_array_equal(out.disp, sample.disp[t:t + 32, x:x + 64])
        np.testing.assert_array_equal(out.right, sample.right[t:t + 32, x:x + 64])
    assert len(corners) > 1  # the window really moves


def test_crop_drops_matches_that_leave_the_window():
    sample = generate_sample(SYN, 1)
    out = crop_sample(sample, 0, 40, 64, 64)
    xs = np.arange(64)[None, :]
    leaving = sample.nonocc[:, 40:104] & (xs - sample.disp[:, 40:104] < 0)
    assert leaving.any()
    assert not (out.nonocc & leaving).any()
    np.testing.assert_array_equal(out.nonocc, sample.nonocc[:, 40:104] & ~leaving)
    np.testing.assert_array_equal(out.valid, sample.valid[:, 40:104])


def test_crop_too_small_names_sample():
    sample = generate_sample(SYN, 0)
    with pytest.raises(DataError, match="synthetic_s11_00000.*smaller than the crop 64x160"):
        augment(sample, AugmentConfig(crop_size=(64, 160), **NO_JITTER), np.random.default_rng(0))


def test_symmetric_jitter_keeps_exact_matches_and_asymmetric_breaks_them():
    sample = generate_sample(SYN, 2)
    sym = AugmentConfig(asymmetric_prob=0.0, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
    out = colour_jitter(sample, sym, np.random.default_rng(3))
    assert np.abs(out.left.astype(int) - sample.left).mean() > 3  # it changed the colours
    assert _match_rate(out) == 1.0
    asym = dataclasses.replace(sym, asymmetric_prob=1.0)
    out = colour_jitter(sample, asym, np.random.default_rng(3))
    assert _match_rate(out) < 0.5


def test_jitter_identity_settings_change_nothing():
    sample = generate_sample(SYN, 2)
    cfg = AugmentConfig(brightness=0, contrast=0, saturation=0, hue=0, gamma=(1.0, 1.0))
    out = colour_jitter(sample, cfg, np.random.default_rng(0))
    np.testing.assert_array_equal(out.left, sample.left)
    np.testing.assert_array_equal(out.right, sample.right)


def test_scale_doubles_disparity_and_keeps_alignment():
    sample = generate_sample(SYN, 3)
    out = scale_sample(sample, 128, 256)
    assert out.left.shape == (128, 256, 3)
    # Nearest-neighbour ground truth at exactly 2x: each source pixel becomes a 2x2 block of 2 * d.
    np.testing.assert_array_equal(out.disp, 2 * np.repeat(np.repeat(sample.disp, 2, 0), 2, 1))
    np.testing.assert_array_equal(out.nonocc, np.repeat(np.repeat(sample.nonocc, 2, 0), 2, 1))
    # Bilinear views still agree where a whole neighbourhood shares one disparity and is visible.
    interior = out.nonocc.copy()
    for dy in (-2, -1, 0, 1, 2):
        for dx in (-2, -1, 0, 1, 2):
            interior &= np.roll(np.roll(out.nonocc & (out.disp == np.roll(np.roll(out.disp, dy, 0), dx, 1)),
                                        -dy, 0), -dx, 1)
    interior[:2] = interior[-2:] = False
    interior[:, :2] = interior[:, -2:] = False
    assert interior.sum() > 0.3 * interior.size
    assert _match_rate(dataclasses.replace(out, nonocc=interior), tol=1) == 1.0


def test_downscale_never_blends_sparse_ground_truth():
    sample = generate_sample(SYN, 4)
    sparse = np.random.default_rng(0).random(sample.disp.shape) > 0.6
    sample = dataclasses.replace(sample, disp=np.where(sparse, sample.disp, 0.0), valid=sparse)
    out = scale_sample(sample, 40, 80)
    factor = 80 / 128
    assert out.valid.any() and not out.valid.all()
    allowed = set(np.round(sample.disp[sparse] * np.float32(factor), 4))
    assert set(np.round(out.disp[out.valid], 4)) <= allowed
    assert (out.disp[~out.valid] == 0).all()


def test_augment_is_seeded_and_scale_respects_crop():
    sample = generate_sample(SYN, 5)
    cfg = AugmentConfig(crop_size=(64, 128), scale_prob=1.0, scale_range=(0.5, 0.9), asymmetric_prob=0.5)
    a = augment(sample, cfg, np.random.default_rng(42))
    b = augment(sample, cfg, np.random.default_rng(42))
    c = augment(sample, cfg, np.random.default_rng(43))
    np.testing.assert_array_equal(a.left, b.left)
    np.testing.assert_array_equal(a.disp, b.disp)
    assert not np.array_equal(a.left, c.left)
    # The scale range asks for shrinking below the crop; the crop still fits (factor raised to >= 1).
    assert a.left.shape == (64, 128, 3)


def test_vflip_keeps_rows_matched():
    sample = generate_sample(SYN, 6)
    out = vflip_sample(sample)
    np.testing.assert_array_equal(out.left, sample.left[::-1])
    np.testing.assert_array_equal(out.disp, sample.disp[::-1])
    assert _match_rate(out) == 1.0


def test_augmentor_in_dataset():
    aug = StereoAugmentor(AugmentConfig(crop_size=(32, 64), asymmetric_prob=0.0, vflip_prob=0.5))
    ds = SyntheticStereoDataset(2, SYN, transform=aug, seed=5)
    item = ds[0]
    assert item["left"].shape == (3, 32, 64) and item["disp"].shape == (1, 32, 64)
    sample = ds.get_sample(1)
    assert _match_rate(sample) == 1.0
