"""Real-pair scoring: the metrics of ``score`` on hand-made arrays, resizing, loading Motorcycle and labelled
folders, the one-line messages without the ``real`` extra, scoring a tiny student and SGBM, BP-2 retention."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from compress.data.io import write_image
from compress.data.synthetic import SyntheticConfig, generate_sample, write_synthetic_dataset
from compress.errors import ConfigError
from compress.real_pairs import (
    SCORE_KEYS,
    RealPair,
    RealPairsConfig,
    fit_size,
    load_real_pairs,
    predict_disparity,
    resize_pair,
    retention,
    score,
    score_model,
    score_sgbm,
    visible_mask,
)
from search_spaces import build_student, preset

INF = np.inf
SYNTH = SyntheticConfig(height=64, width=128, max_disp=16, num_objects=2, seed=0)

# 4 x 6 ground truth. Visible (x - d >= 0): row 0 at x >= 1 (5 px), row 1 at x = 2..4 (3 px; x = 5 has no GT),
# row 2 at x >= 3 (3 px), row 3 at x = 5 (1 px): 12 scored pixels; 22 pixels have GT (with the left band).
GT = np.array([[1, 1, 1, 1, 1, 1],
               [2, 2, 2, 2, 2, INF],
               [INF, 3, 3, 3, 3, 3],
               [5, 5, 5, 5, 5, 5]], np.float32)
# Errors on the visible pixels: row 0: 0, 0.5, 1.5, 2.5, 4; row 1: 0, 0, 0; row 2: 0, 0, 3.5; row 3: 0 (sum 12).
# In the band: row 0 x=0 exact, row 1 x=0,1 off by 7, row 2 x=1,2 exact, row 3 x=0..4 exact (band sum 14).
PRED = np.array([[1, 1, 1.5, 2.5, 3.5, 5],
                 [9, 9, 2, 2, 2, 0],
                 [0, 3, 3, 3, 3, 6.5],
                 [5, 5, 5, 5, 5, 5]], np.float32)


def test_visible_mask_leaves_out_the_left_band_and_missing_gt():
    assert visible_mask(GT).sum(axis=1).tolist() == [5, 3, 3, 1]
    assert not visible_mask(GT)[1, 5] and not visible_mask(GT)[2, 0] and not visible_mask(GT)[0, 0]


def test_score_of_a_model_on_a_hand_made_example():
    s = score(PRED, GT)
    assert s["pixels"] == 12 and s["density"] == 100.0 and "valid_only" not in s
    m = s["metrics"]
    assert m["epe"] == pytest.approx(1.0)  # 12 / 12
    # > 1: 1.5, 2.5, 4, 3.5; > 2: 2.5, 4, 3.5; > 3 (and D1, > 5 % of d too): 4, 3.5.
    assert (m["bp1"], m["bp2"], m["bp3"], m["d1"]) == pytest.approx((400 / 12, 300 / 12, 200 / 12, 200 / 12))
    assert s["with_band"]["epe"] == pytest.approx(26 / 22)
    exact = score(np.where(np.isfinite(GT), GT, 0), GT)["metrics"]
    assert exact == pytest.approx({"epe": 0.0, "d1": 0.0, "bp0.5": 0.0, "bp1": 0.0, "bp2": 0.0, "bp3": 0.0})


def test_score_counts_sgbm_holes_as_bad_pixels():
    pred = PRED.copy()
    pred[1, 3] = -1  # a hole on a visible pixel that was exact
    pred[0, 0] = -1  # a hole in the band: not scored, except with the band
    s = score(pred, GT, holes=pred < 0)
    assert s["pixels"] == 12 and s["density"] == pytest.approx(100 * 11 / 12)
    v = s["valid_only"]  # 11 pixels, the same 12 px of error
    assert v["epe"] == pytest.approx(12 / 11)
    assert (v["bp1"], v["bp2"], v["bp3"], v["d1"]) == pytest.approx((400 / 11, 300 / 11, 200 / 11, 200 / 11))
    h = s["metrics"]  # the hole is one more bad pixel of 12 at every threshold; EPE stays on the valid pixels
    assert h["epe"] == pytest.approx(12 / 11)
    assert (h["bp1"], h["bp2"], h["bp3"], h["d1"]) == pytest.approx((500 / 12, 400 / 12, 300 / 12, 300 / 12))
    # With the band: 22 GT pixels, both holes bad; > 2: 2.5, 4, 3.5, 7, 7 and the two holes. EPE: 26 px / 20.
    assert s["with_band"]["bp2"] == pytest.approx(700 / 22)
    assert s["with_band"]["epe"] == pytest.approx(26 / 20)


def test_resize_pair_keeps_the_aspect_on_multiples_of_32_and_samples_the_gt_at_the_nearest_pixel():
    gt = np.array([[1, 2, INF, 4], [5, 6, 7, 8]], np.float32)
    image = np.zeros((2, 4, 3), np.uint8)
    left, right, small = resize_pair(image, image, gt, 32)
    assert left.shape == right.shape == (32, 64, 3) and left.dtype == np.uint8
    # Each source pixel becomes a 16 x 16 block; disparities grow with the width, 4 -> 64 px: times 16.
    np.testing.assert_array_equal(small, np.kron(gt, np.ones((16, 16), np.float32)) * 16)
    # 50 x 75 to about 64 high: 64 x 96 (aspect 1.5 kept); nearest pixel: rows (r + 0.5) * 50 / 64, cols * 75 / 96.
    assert fit_size(50, 75, 64) == (64, 96) and fit_size(50, 75, 70) == (64, 96)
    ramp = (np.arange(75)[None, :] + 100 * np.arange(50)[:, None]).astype(np.float32)
    left, _, small = resize_pair(np.zeros((50, 75, 3), np.uint8), np.zeros((50, 75, 3), np.uint8), ramp, 64)
    assert left.shape == (64, 96, 3) and small.shape == (64, 96)
    assert small[0, 0] == 0 and small[1, 1] == pytest.approx(101 * 1.28)
    assert small[63, 95] == pytest.approx((49 * 100 + 74) * 1.28)
    assert set((small / np.float32(1.28)).round().astype(int).ravel()) <= set(ramp.astype(int).ravel())


def test_real_pair_marks_missing_ground_truth_as_inf():
    image = np.zeros((1, 4, 3), np.uint8)
    pair = RealPair("p", image, image, np.array([[0.0, -1.0, np.nan, 2.0]]))
    assert pair.gt.dtype == np.float32 and pair.gt.tolist() == [[INF, INF, INF, 2.0]]


def test_load_motorcycle_at_full_size_and_resized():
    (full,) = load_real_pairs(RealPairsConfig())
    assert full.name == "motorcycle"
    assert full.left.shape == full.right.shape == (500, 741, 3) and full.gt.shape == (500, 741)
    (small,) = load_real_pairs(RealPairsConfig(height=256))
    assert small.left.shape == (256, 384, 3) and small.gt.shape == (256, 384)
    assert np.nanmax(np.where(np.isfinite(small.gt), small.gt, np.nan)) == pytest.approx(
        np.nanmax(np.where(np.isfinite(full.gt), full.gt, np.nan)) * 384 / 741, rel=0.02)
    assert load_real_pairs(RealPairsConfig(enabled=False)) == []


def test_without_scikit_image_motorcycle_is_skipped_with_one_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    said: list[str] = []
    assert load_real_pairs(RealPairsConfig(), say=said.append) == []
    assert len(said) == 1 and "Motorcycle" in said[0] and ".[real]" in said[0] and "\n" not in said[0]


def test_without_opencv_sgbm_is_skipped_with_one_message(monkeypatch):
    sample = generate_sample(SYNTH, 0)
    pair = RealPair("synthetic", sample.left, sample.right, sample.disp)
    monkeypatch.setitem(sys.modules, "cv2", None)
    said: list[str] = []
    assert score_sgbm([pair, pair], say=said.append) is None
    assert len(said) == 1 and "SGBM" in said[0] and ".[real]" in said[0]


def test_labelled_folder_loads_and_scores(tmp_path):
    folder = tmp_path / "labelled"
    write_synthetic_dataset(folder, 2, SYNTH, progress=False)
    pairs = load_real_pairs(RealPairsConfig(pairs=[str(folder)]))
    assert [p.name for p in pairs] == ["labelled/scene_0000", "labelled/scene_0001"]
    for i, pair in enumerate(pairs):
        expected = generate_sample(SYNTH, i)
        np.testing.assert_array_equal(pair.left, expected.left)
        np.testing.assert_array_equal(pair.gt, expected.disp)
        assert score(pair.gt.copy(), pair.gt)["metrics"]["bp2"] == 0.0
    assert len(load_real_pairs(RealPairsConfig(pairs=[str(folder)], limit=1))) == 1
    (half,) = load_real_pairs(RealPairsConfig(pairs=[str(folder)], limit=1, height=32))
    assert half.gt.shape == (32, 64)

    torch.manual_seed(0)
    student = build_student(preset("tiny"))
    student.train()
    scores = score_model(student, pairs, iters=1)
    assert student.training  # the caller's mode is left as it was
    assert list(scores) == ["labelled/scene_0000", "labelled/scene_0001", "mean"]
    for row in scores.values():
        assert tuple(row) == SCORE_KEYS and all(math.isfinite(v) for v in row.values())
        assert 0 <= row["bp1"] <= 100 and row["bp3"] <= row["bp2"] <= row["bp1"] and row["seconds"] > 0
    assert scores["mean"]["bp2"] == pytest.approx((scores["labelled/scene_0000"]["bp2"]
                                                    + scores["labelled/scene_0001"]["bp2"]) / 2)

    cv2 = pytest.importorskip("cv2")
    threads = cv2.getNumThreads()
    sgbm_scores = score_sgbm(pairs, threads=1)
    assert cv2.getNumThreads() == threads
    assert sgbm_scores is not None and list(sgbm_scores) == list(scores)
    for row in sgbm_scores.values():
        assert tuple(row) == SCORE_KEYS and all(math.isfinite(v) for v in row.values())
        assert 0 < row["bp2"] < 50  # textured pairs: SGBM matches most pixels; its holes count as bad
    assert score_sgbm([]) == {} and score_model(student, []) == {}


def test_a_tiny_student_on_motorcycle_at_full_size(monkeypatch):
    (pair,) = load_real_pairs(RealPairsConfig(sgbm=False))
    torch.manual_seed(0)
    student = build_student(preset("tiny"))
    disp = predict_disparity(student, pair, iters=1, device="cpu")
    assert disp.shape == (500, 741) and disp.dtype == np.float32 and np.isfinite(disp).all()
    monkeypatch.setattr("compress.real_pairs.predict_disparity", lambda *args: disp)
    scores = score_model(student, [pair])
    assert list(scores) == ["motorcycle", "mean"] and scores["mean"] == scores["motorcycle"]
    expected = score(disp, pair.gt)["metrics"]
    assert {k: scores["mean"][k] for k in ("epe", "bp2", "d1")} == pytest.approx(
        {k: expected[k] for k in ("epe", "bp2", "d1")})


def test_folder_without_ground_truth_is_a_config_error_naming_it(tmp_path):
    folder = tmp_path / "unlabelled"
    image = generate_sample(SYNTH, 0).left
    for name in ("im0.png", "im1.png"):
        write_image(folder / "scene" / name, image)
    with pytest.raises(ConfigError, match="unlabelled.*no ground-truth"):
        load_real_pairs(RealPairsConfig(pairs=[str(folder)]))
    with pytest.raises(ConfigError, match="missing"):
        load_real_pairs(RealPairsConfig(pairs=[str(tmp_path / "missing")]))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"height": 16}, "height: got 16, expected an integer >= 32"),
    ({"limit": 0}, "limit: got 0"),
    ({"pairs": ["motorcycle", "motorcycle"]}, "more than once"),
    ({"pairs": "motorcycle"}, "expected a list"),
    ({"pairs": []}, "enabled: false"),
    ({"sgbm": "yes"}, "sgbm: got 'yes'"),
])
def test_config_mistakes_are_one_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        RealPairsConfig(**overrides)
    assert RealPairsConfig(enabled=False, pairs=[]).pairs == []


def test_retention_is_student_bp2_over_teacher_bp2():
    assert retention(3.0, 2.0) == 1.5
    assert retention(0.0, 4.0) == 0.0
    assert retention(0.0, 0.0) == 1.0
    assert retention(1.0, 0.0) == math.inf
    assert math.isnan(retention(math.nan, 2.0))
