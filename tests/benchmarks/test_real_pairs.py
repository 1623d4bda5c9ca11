"""benchmarks/real_pairs.py and the compress.real_pairs functions it runs: sizes and ground-truth scaling, SGBM on a
textured pair, the metrics on a hand-computed example, and the files one run writes (a tiny random student on the
real pair at 64x96)."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from PIL import Image

from benchmarks.real_pairs import main
from compress.data.synthetic import SyntheticConfig, generate_sample
from compress.errors import MissingDependencyError
from compress.metrics import compute_metrics
from compress.real_pairs import fit_size, load_motorcycle, resize_pair, score, sgbm, sgbm_num_disparities

INF = np.inf


def test_sizes_round_to_32_and_ground_truth_scales_with_the_width():
    assert fit_size(500, 741, 256) == (256, 384)
    assert fit_size(500, 741, 384) == (384, 576)
    assert fit_size(500, 741, 64) == (64, 96)
    image = np.zeros((100, 200, 3), np.uint8)
    gt = np.full((100, 200), 10.0, np.float32)
    gt[:50, :100] = INF  # the top-left quarter has no ground truth
    left, right, small = resize_pair(image, image, gt, 64)
    assert left.shape == right.shape == (64, 128, 3) and small.shape == (64, 128)
    assert np.isinf(small[:32, :64]).all()
    np.testing.assert_allclose(small[32:], 10.0 * 128 / 200)  # disparity in pixels of the new width
    np.testing.assert_allclose(small[:32, 64:], 6.4)


def test_num_disparities_is_the_multiple_of_16_above_the_largest_gt():
    assert sgbm_num_disparities(np.array([[3.0, 31.0, INF]], np.float32)) == 32
    assert sgbm_num_disparities(np.array([[32.0, INF]], np.float32)) == 48
    assert sgbm_num_disparities(np.array([[0.5]], np.float32)) == 16


def test_sgbm_is_near_exact_on_a_textured_synthetic_pair():
    for index in range(2):
        sample = generate_sample(SyntheticConfig(height=64, width=128, max_disp=16, seed=0), index)
        disp = sgbm(sample.left, sample.right, sgbm_num_disparities(sample.disp))
        assert disp.shape == sample.disp.shape and disp.dtype == np.float32
        counted = sample.nonocc & (np.arange(128)[None, :] >= sample.disp)
        found = disp >= 0
        assert found[counted].mean() > 0.75  # holes: the left band of numDisparities columns, a few edges
        m = compute_metrics(disp, sample.disp, found, counted)
        assert m["epe"] < 0.5 and m["bp2"] < 5.0, m


def test_score_on_a_hand_computed_example():
    gt = np.array([[1, 1, 1, 1, 1], [2, 2, 2, 2, INF]], np.float32)
    # Scored: row 0 at x >= 1, row 1 at x = 2, 3 (x < d is out of the right view; x = 4 has no GT): 6 pixels.
    pred = np.array([[9, 1.5, 3.5, -1, 1], [9, 9, 2, 6, 0]], np.float32)
    sgbm_like = score(pred, gt, holes=pred < 0)
    assert sgbm_like["pixels"] == 6
    assert sgbm_like["density"] == pytest.approx(100 * 5 / 6)
    # Its valid pixels: errors 0.5, 2.5, 0, 0, 4.
    v = sgbm_like["valid_only"]
    assert v["epe"] == pytest.approx(7 / 5)
    assert (v["bp1"], v["bp2"], v["bp3"], v["d1"]) == pytest.approx((40.0, 40.0, 20.0, 20.0))
    # Holes as bad pixels: one more bad pixel of six at every threshold; EPE stays on the valid pixels.
    h = sgbm_like["metrics"]
    assert h["epe"] == pytest.approx(7 / 5)
    assert (h["bp1"], h["bp2"], h["bp3"], h["d1"]) == pytest.approx((50.0, 50.0, 100 / 3, 100 / 3))
    # With the band: every finite GT pixel but the hole, errors 8, 0.5, 2.5, 0, 7, 7, 0, 4.
    assert sgbm_like["with_band"]["epe"] == pytest.approx(29 / 8)
    # A model's negative disparity is a (wrong) prediction, not a hole: error 2 at (0, 3).
    model = score(pred, gt)
    assert model["density"] == 100.0 and "valid_only" not in model
    assert model["metrics"]["epe"] == pytest.approx(9 / 6)
    assert (model["metrics"]["bp1"], model["metrics"]["bp2"]) == pytest.approx((50.0, 100 / 3))


def test_main_writes_json_markdown_and_png_for_a_tiny_student(tmp_path):
    import torch

    from search_spaces import build_student, preset, save_student

    torch.manual_seed(0)
    student = save_student(build_student(preset("tiny")), tmp_path / "tiny")
    out = tmp_path / "results"
    assert main(["--model", f"tiny={student}", "--heights", "64", "--iters", "2", "--out", str(out)]) == 0
    (json_path,) = out.glob("real-pairs-*.json")
    report = json.loads(json_path.read_text())
    assert report["models"]["tiny"]["iters"] == 2 and report["models"]["tiny"]["max_disp"] == 64
    assert "--heights 64" in report["command"]
    (size,) = report["sizes"]
    assert size["size"] == [64, 96] and size["sgbm_num_disparities"] == 16
    lo, hi = size["gt_range"]
    assert 0 < lo < hi < 16  # Motorcycle's 60 px at 741 wide, scaled to 96
    assert set(size["methods"]) == {"SGBM", "tiny"}
    for name, res in size["methods"].items():
        assert set(res["metrics"]) >= {"epe", "bp1", "bp2", "bp3", "d1"}
        assert res["seconds"] >= 0 and res["pixels"] == size["pixels"] > 4000
        assert all(math.isfinite(v) for v in res["metrics"].values()), name
    assert 50 < size["methods"]["SGBM"]["density"] < 100 and "valid_only" in size["methods"]["SGBM"]
    md = json_path.with_suffix(".md").read_text()
    assert "| SGBM, holes as errors |" in md and "| tiny | 100.0 |" in md and "## 64x96" in md
    with Image.open(json_path.with_suffix(".png")) as png:
        assert png.format == "PNG" and png.width > 600


def test_real_pair_loads_with_its_ground_truth():
    left, right, disp = load_motorcycle()
    assert left.shape == right.shape == (500, 741, 3) and left.dtype == np.uint8
    finite = np.isfinite(disp)
    assert 0.85 < finite.mean() < 1 and 0 < disp[finite].min() and disp[finite].max() < 64


def test_bad_model_spec_is_one_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "no-equals-sign", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "expected NAME=PATH" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_missing_opencv_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # what an environment without opencv-python-headless imports
    with pytest.raises(MissingDependencyError, match=r'\.\[real\]'):
        sgbm(np.zeros((32, 64, 3), np.uint8), np.zeros((32, 64, 3), np.uint8), 16)
