"""Metrics against values worked out by hand on small arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compress.errors import DataError
from compress.metrics import (
    METRIC_KEYS,
    MetricAccumulator,
    agreement,
    bad_pixel,
    compute_metrics,
    d1,
    epe,
)

INF = np.inf
# Image A (2 x 4). Absolute errors, pixel by pixel:
#   row 0: |1.4-1|=0.4  |3.5-2|=1.5  |13.5-10|=3.5  |104-100|=4.0
#   row 1: |5-4|=1.0    gt inf -> not counted        |52.1-50|=2.1  |8.6-8|=0.6
# 7 counted pixels, error sum 0.4+1.5+3.5+4.0+1.0+2.1+0.6 = 13.1 -> EPE = 13.1/7 = 1.8714285714
# > 0.5: 1.5, 3.5, 4.0, 1.0, 2.1, 0.6 -> 6/7 = 85.714285 %
# > 1:   1.5, 3.5, 4.0, 2.1 (1.0 is not strictly above 1) -> 4/7 = 57.142857 %
# > 2:   3.5, 4.0, 2.1 -> 3/7 = 42.857142 %
# > 3:   3.5, 4.0 -> 2/7 = 28.571428 %
# D1 (> 3 px and > 5 % of gt): 3.5 vs 5 % of 10 = 0.5 -> yes; 4.0 vs 5 % of 100 = 5.0 -> no -> 1/7 = 14.285714 %
GT_A = np.array([[1.0, 2.0, 10.0, 100.0], [4.0, INF, 50.0, 8.0]])
PRED_A = np.array([[1.4, 3.5, 13.5, 104.0], [5.0, 0.0, 52.1, 8.6]])
EXPECTED_A = {"epe": 13.1 / 7, "d1": 100 / 7, "bp0.5": 600 / 7, "bp1": 400 / 7, "bp2": 300 / 7, "bp3": 200 / 7}

# Image B (1 x 2): errors 0 and 10; 10 > 3 and 10 > 5 % of 20 = 1 -> D1 and bp3 both 1/2 = 50 %.
GT_B = np.array([[10.0, 20.0]])
PRED_B = np.array([[10.0, 30.0]])
EXPECTED_B = {"epe": 5.0, "d1": 50.0, "bp0.5": 50.0, "bp1": 50.0, "bp2": 50.0, "bp3": 50.0}


def _approx(d):
    return {k: pytest.approx(v, rel=1e-9) for k, v in d.items()}


def test_compute_metrics_by_hand():
    assert compute_metrics(PRED_A, GT_A) == _approx(EXPECTED_A)
    assert list(compute_metrics(PRED_A, GT_A)) == list(METRIC_KEYS)
    assert epe(PRED_A, GT_A) == pytest.approx(13.1 / 7)
    assert d1(PRED_A, GT_A) == pytest.approx(100 / 7)
    assert bad_pixel(PRED_A, GT_A, 1.0) == pytest.approx(400 / 7)
    assert bad_pixel(PRED_A, GT_A, 0.99) == pytest.approx(500 / 7)  # now the 1.0 error counts


def test_valid_and_nonocc_masks():
    # valid drops (0,3) (error 4.0): 6 pixels, sum 9.1 -> EPE 1.5166667; > 3: only 3.5 -> 1/6; D1 1/6.
    valid = np.ones_like(GT_A, dtype=bool)
    valid[0, 3] = False
    got = compute_metrics(PRED_A, GT_A, valid)
    assert got["epe"] == pytest.approx(9.1 / 6)
    assert got["bp3"] == pytest.approx(100 / 6) and got["d1"] == pytest.approx(100 / 6)
    # nonocc also drops (0,2): errors 0.4, 1.5, 1.0, 2.1, 0.6 -> sum 5.6, EPE 1.12;
    # > 0.5: 1.5, 1.0, 2.1, 0.6 -> 80 %; > 1: 1.5, 2.1 -> 40 %; > 2: 2.1 -> 20 %; > 3 none; D1 none.
    nonocc = np.ones_like(GT_A, dtype=bool)
    nonocc[0, 2] = False
    got = compute_metrics(PRED_A, GT_A, valid, nonocc)
    assert got == _approx({"epe": 1.12, "d1": 0.0, "bp0.5": 80.0, "bp1": 40.0, "bp2": 20.0, "bp3": 0.0})


def test_torch_inputs_match_numpy():
    got = compute_metrics(torch.tensor(PRED_A, dtype=torch.float32)[None, None], torch.tensor(GT_A)[None, None],
                          torch.ones(1, 1, 2, 4, dtype=torch.bool))
    assert got == {k: pytest.approx(v, rel=1e-6) for k, v in EXPECTED_A.items()}


def test_shape_mismatch_is_clear():
    with pytest.raises(DataError, match=r"prediction has shape \(2, 3\) but ground truth has shape \(2, 4\)"):
        compute_metrics(PRED_A[:, :3], GT_A)
    with pytest.raises(DataError, match="valid mask has shape"):
        compute_metrics(PRED_A, GT_A, np.ones((4, 2), dtype=bool))
    with pytest.raises(DataError, match="numpy array or torch tensor"):
        epe([1.0], [1.0])


def test_non_finite_prediction_counts_as_wrong_and_empty_is_nan():
    pred = PRED_A.copy()
    pred[1, 0] = np.nan
    got = compute_metrics(pred, GT_A)
    assert got["epe"] == INF
    assert got["bp3"] == pytest.approx(300 / 7)  # the nan pixel joins 3.5 and 4.0 above 3 px
    empty = compute_metrics(PRED_A, GT_A, np.zeros_like(GT_A, dtype=bool))
    assert all(np.isnan(v) for v in empty.values())


def test_accumulator_pixel_weighted_and_per_image_mean():
    acc = MetricAccumulator()
    assert acc.update(PRED_A, GT_A, names="a")[0] == _approx(EXPECTED_A)
    acc.update(PRED_B, GT_B, names="b")
    acc.update(PRED_B, GT_B, valid=np.zeros_like(GT_B, dtype=bool), names="nothing")
    # Pixel-weighted: (13.1 + 10) / (7 + 2) = 2.5666667 px; bp3 = (2 + 1) / 9 = 33.33 %;
    # D1 = (1 + 1) / 9 = 22.22 %; bp0.5 = (6 + 1) / 9 = 77.78 %.
    pooled = acc.compute()
    assert pooled["epe"] == pytest.approx(23.1 / 9)
    assert pooled["bp3"] == pytest.approx(300 / 9) and pooled["d1"] == pytest.approx(200 / 9)
    assert pooled["bp0.5"] == pytest.approx(700 / 9)
    # Per-image mean over the two scored images: EPE (1.8714286 + 5) / 2 = 3.4357143;
    # bp3 (28.571429 + 50) / 2 = 39.285714 %. The image with no valid pixel is skipped.
    mean = acc.per_image_mean()
    assert mean["epe"] == pytest.approx((13.1 / 7 + 5) / 2)
    assert mean["bp3"] == pytest.approx((200 / 7 + 50) / 2)
    summary = acc.summary()
    assert summary["num_images"] == 3 and summary["num_pixels"] == 9
    assert summary["epe_image_mean"] == pytest.approx(mean["epe"])
    assert acc.names == ["a", "b", "nothing"] and np.isnan(acc.per_image[2]["epe"])
    acc.reset()
    assert acc.num_images == 0 and np.isnan(acc.compute()["epe"])


def test_accumulator_batches_split_into_images():
    # Batch of two 1x2 images: B (errors 0, 10) and a perfect copy of GT_B (errors 0, 0).
    pred = torch.tensor(np.stack([PRED_B, GT_B]))[:, None]
    gt = torch.tensor(np.stack([GT_B, GT_B]))[:, None]
    acc = MetricAccumulator()
    per = acc.update(pred, gt, torch.ones_like(gt, dtype=torch.bool))
    assert len(per) == 2 and per[1]["epe"] == 0.0
    assert acc.compute()["epe"] == pytest.approx(10 / 4)
    assert acc.per_image_mean()["epe"] == pytest.approx((5 + 0) / 2)


def test_agreement_uses_teacher_as_reference():
    teacher = np.array([[10.0, 20.0], [30.0, np.nan]])
    student = np.array([[10.5, 20.0], [34.0, 7.0]])
    # Counted: 3 finite teacher pixels; errors 0.5, 0, 4 -> EPE 1.5; > 0.5 only 4 -> 33.3 %;
    # > 3: 4 -> 33.3 %; D1: 4 > 3 and 4 > 1.5 -> 33.3 %.
    got = agreement(student, teacher)
    assert got["epe"] == pytest.approx(1.5)
    assert got["bp0.5"] == pytest.approx(100 / 3) and got["d1"] == pytest.approx(100 / 3)
    assert agreement(teacher, teacher)["epe"] == 0.0
