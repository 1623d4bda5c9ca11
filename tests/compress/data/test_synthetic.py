"""Procedural stereo: determinism, exact photo-consistency, correct occlusions, Middlebury round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compress.data.readers import MiddleburyDataset, open_dataset
from compress.data.synthetic import (
    SyntheticConfig,
    SyntheticStereoDataset,
    generate_sample,
    write_synthetic_dataset,
)
from compress.errors import ConfigError
from compress.geometry import depth_from_disparity

CFG = SyntheticConfig(height=48, width=96, max_disp=20.0, num_objects=4, seed=3)


def _matches(sample):
    """Right-view colour at x - d for every left pixel whose match lies inside the image."""
    h, w = sample.disp.shape
    ys, xs = np.mgrid[0:h, 0:w]
    xr = xs - sample.disp.astype(np.int64)
    inside = xr >= 0
    right_at = sample.right[ys, np.clip(xr, 0, w - 1)]
    return (right_at == sample.left).all(axis=2), inside


def test_same_seed_same_pair_and_different_seed_differs():
    a, b = generate_sample(CFG, 2), generate_sample(CFG, 2)
    for key in ("left", "right", "disp", "nonocc"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    other_seed = generate_sample(SyntheticConfig(**{**CFG.__dict__, "seed": 4}), 2)
    other_index = generate_sample(CFG, 3)
    for other in (other_seed, other_index):
        assert not np.array_equal(a.left, other.left)
        assert not np.array_equal(a.disp, other.disp)


@pytest.mark.parametrize("index", range(4))
def test_nonocc_pixels_match_exactly(index):
    sample = generate_sample(CFG, index)
    equal, inside = _matches(sample)
    assert sample.nonocc.mean() > 0.5  # not vacuous: most of the image is visible in both views
    assert equal[sample.nonocc].all()
    assert not (sample.nonocc & ~inside).any()
    # The texture pins the match down: one pixel off, almost nothing matches any more.
    for offset in (-1, 1):
        shifted = generate_sample(CFG, index)
        shifted.disp = shifted.disp + offset
        equal_off, _ = _matches(shifted)
        assert equal_off[sample.nonocc].mean() < 0.05


@pytest.mark.parametrize("index", range(4))
def test_occlusions_follow_nearer_wins(index):
    sample = generate_sample(CFG, index)
    h, w = sample.disp.shape
    d = sample.disp.astype(np.int64)
    target = np.arange(w)[None, :] - d
    # For every right pixel, the nearest left-visible surface landing there (largest disparity).
    nearest = np.full((h, w), -1, dtype=np.int64)
    rows = np.broadcast_to(np.arange(h)[:, None], (h, w))
    inside = target >= 0
    np.maximum.at(nearest, (rows[inside], target[inside]), d[inside])
    # A nonocc pixel is never behind another left-visible pixel that lands on the same right pixel.
    assert (d[sample.nonocc] >= nearest[rows[sample.nonocc], target[sample.nonocc]]).all()
    # Objects occlude something: some in-view pixels are hidden in the right view.
    assert (inside & ~sample.nonocc).sum() > 0


def test_disparity_range_and_validity():
    for i in range(3):
        s = generate_sample(CFG, i)
        assert s.disp.dtype == np.float32 and s.valid.all()
        assert s.disp.min() >= CFG.min_disp and s.disp.max() <= CFG.max_disp
        np.testing.assert_array_equal(s.disp, np.round(s.disp))  # whole-pixel ground truth
        assert s.disp.max() - s.disp.min() >= 3  # objects stand out from the background


def test_background_is_a_slanted_plane():
    cfg = SyntheticConfig(height=48, width=96, max_disp=40.0, num_objects=0, max_slope=0.3, seed=1)
    found_slant = False
    for i in range(3):
        s = generate_sample(cfg, i)
        h, w = s.disp.shape
        ys, xs = np.mgrid[0:h, 0:w]
        design = np.stack([np.ones(h * w), xs.ravel(), ys.ravel()], axis=1)
        coef, *_ = np.linalg.lstsq(design, s.disp.ravel().astype(np.float64), rcond=None)
        residual = np.abs(design @ coef - s.disp.ravel())
        assert residual.max() <= 0.75  # whole-pixel rounding of a plane
        found_slant |= s.disp.max() - s.disp.min() >= 2
        equal, _ = _matches(s)
        assert equal[s.nonocc].all() and s.nonocc.mean() > 0.7
    assert found_slant


def test_config_validation():
    with pytest.raises(ConfigError, match="max_disp"):
        SyntheticConfig(width=32, max_disp=40)
    with pytest.raises(ConfigError, match="min_disp"):
        SyntheticConfig(min_disp=0)
    with pytest.raises(ConfigError, match="shapes"):
        SyntheticConfig(shapes=("triangle",))
    with pytest.raises(ConfigError, match="max_slope"):
        SyntheticConfig(max_slope=0.6)


def test_dataset_items():
    ds = SyntheticStereoDataset(3, CFG)
    assert len(ds) == 3
    item = ds[-1]
    assert item["left"].shape == (3, 48, 96) and item["left"].dtype == torch.float32
    assert item["disp"].shape == (1, 48, 96) and bool(item["valid"].all())
    assert torch.equal(item["disp"][0], torch.from_numpy(generate_sample(CFG, 2).disp))
    assert int(item["nonocc"].sum()) < 48 * 96


def test_written_dataset_reads_back_as_middlebury(tmp_path):
    scenes = write_synthetic_dataset(tmp_path / "syn", 2, CFG, progress=False)
    assert [p.name for p in scenes] == ["scene_0000", "scene_0001"]
    assert not any(p.name.startswith(".") for p in (tmp_path / "syn").iterdir())
    ds = open_dataset(tmp_path / "syn")
    assert isinstance(ds, MiddleburyDataset) and len(ds) == 2
    for i in range(2):
        read, made = ds.load(i), generate_sample(CFG, i)
        for key in ("left", "right", "disp", "valid", "nonocc"):
            np.testing.assert_array_equal(getattr(read, key), getattr(made, key))
        # depth = f * B / d from the written calib.txt (baseline in mm) equals the configured rig's.
        f, baseline_mm = read.calib["cam0"][0, 0], read.calib["baseline"]
        np.testing.assert_allclose(
            depth_from_disparity(read.disp, f, baseline_mm / 1000.0, read.calib["doffs"], invalid=np.inf),
            CFG.focal_px * CFG.baseline_m / made.disp.astype(np.float64),
            rtol=1e-6,
        )
        assert read.calib["ndisp"] > made.disp.max()


COLOURS = np.array([[10, 200, 30], [200, 20, 90]])


def _photos(folder):
    """A folder of two flat-coloured 'photographs' (so every photo-textured pixel is recognisable)."""
    from compress.data.io import write_image

    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(COLOURS):
        write_image(folder / f"photo{i}.png", np.broadcast_to(colour.astype(np.uint8), (40, 60, 3)).copy())
    (folder / "notes.txt").write_text("not a photograph")  # ignored
    return folder


def test_photo_textures_come_from_the_folder_and_keep_exact_matches(tmp_path):
    cfg = SyntheticConfig(height=48, width=96, max_disp=20.0, num_objects=3, seed=3,
                          texture_dir=str(_photos(tmp_path / "photos")), photo_prob=1.0)
    a, b = generate_sample(cfg, 1), generate_sample(cfg, 1)
    np.testing.assert_array_equal(a.left, b.left)
    # Every pixel is one of the photographs' colours up to the +-2 grey levels of sensor grain.
    distance = np.abs(a.left[:, :, None, :].astype(int) - COLOURS[None, None]).max(axis=3).min(axis=2)
    assert distance.max() <= 2
    equal, inside = _matches(a)
    assert a.nonocc.mean() > 0.5 and equal[a.nonocc].all()
    procedural = generate_sample(SyntheticConfig(**{**cfg.__dict__, "photo_prob": 0.0}), 1)
    far = np.abs(procedural.left[:, :, None, :].astype(int) - COLOURS[None, None]).max(axis=3).min(axis=2) > 2
    assert far.mean() > 0.9  # photo_prob 0: procedural textures only


def test_per_sample_disparity_range(tmp_path):
    cfg = SyntheticConfig(height=48, width=96, max_disp=40.0, max_disp_low=8.0, num_objects=3, seed=0)
    tops = [generate_sample(cfg, i).disp.max() for i in range(12)]
    assert max(tops) <= 40 and min(tops) >= 4
    assert max(tops) - min(tops) > 10  # the range really varies between samples
    fixed = [generate_sample(SyntheticConfig(height=48, width=96, max_disp=40.0, num_objects=3, seed=0), i).disp.max()
             for i in range(12)]
    assert min(fixed) > 20  # without it every sample's objects sit in the upper half of [1, 40]


def test_texture_and_range_validation(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="is not a folder"):
        SyntheticConfig(texture_dir=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="holds no photographs"):
        SyntheticConfig(texture_dir=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="photo_prob"):
        SyntheticConfig(photo_prob=1.5)
    with pytest.raises(ConfigError, match=r"max_disp_low=2.*\[4.0, 32.0\]"):
        SyntheticConfig(max_disp_low=2)


def test_skimage_textures_are_scikit_images_photographs_and_need_it(monkeypatch):
    import sys

    from compress.data import synthetic

    photos = synthetic.skimage_photos()
    assert len(photos) == len(synthetic.SKIMAGE_TEXTURES) and all(p.ndim == 3 and p.shape[2] == 3 for p in photos)
    cfg = SyntheticConfig(height=48, width=96, max_disp=20.0, num_objects=2, seed=0, texture_dir="skimage",
                          photo_prob=1.0)
    equal, _ = _matches(generate_sample(cfg, 0))
    assert equal[generate_sample(cfg, 0).nonocc].all()  # photographs keep the exact matches
    synthetic._photos.cache_clear()
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    try:
        with pytest.raises(ConfigError, match=r"texture_dir 'skimage' needs scikit-image.*\.\[real\]"):
            SyntheticConfig(texture_dir="skimage")
    finally:
        synthetic._photos.cache_clear()
