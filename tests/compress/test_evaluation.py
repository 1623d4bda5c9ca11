"""Evaluation: the metrics of a model on a dataset, in Python and as ``ffsc eval`` on any saved --model."""

from __future__ import annotations

import json

import pytest
import torch

from compress.cli import main
from compress.data import SyntheticConfig, SyntheticStereoDataset, write_synthetic_dataset
from compress.evaluation import evaluate_student
from search_spaces import build_student, preset, save_student

CFG = SyntheticConfig(height=64, width=96, max_disp=16, num_objects=2, seed=0)


class _Oracle(torch.nn.Module):
    """Returns a fixed disparity: the ground truth plus one pixel, whatever the input."""

    def __init__(self, disp: torch.Tensor) -> None:
        super().__init__()
        self.disp = disp

    def forward(self, left, right, iters, test_mode):
        pad_h, pad_w = left.shape[-2] - self.disp.shape[-2], left.shape[-1] - self.disp.shape[-1]
        return torch.nn.functional.pad(self.disp + 1, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


def test_metrics_against_ground_truth_and_teacher_on_images_padded_to_32() -> None:
    data = SyntheticStereoDataset(1, CFG)  # cropped to 70 px wide below: the model sees a 96 px wide padded pair
    item = data[0]
    item = {**item, **{k: item[k][..., :70] for k in ("left", "right", "disp", "valid")}}
    model = _Oracle(item["disp"][None].float())
    scores = evaluate_student(model, [item], iters=1, teacher_disps=[item["disp"][None].float() + 3])
    assert scores["gt/epe"] == pytest.approx(1.0) and scores["teacher/epe"] == pytest.approx(2.0)
    assert scores["gt/bp0.5"] == pytest.approx(100.0) and scores["gt/bp2"] == pytest.approx(0.0)


def test_ffsc_eval_reads_a_saved_student(tmp_path) -> None:
    write_synthetic_dataset(tmp_path / "data", 2, CFG, progress=False)
    torch.manual_seed(0)
    save_student(build_student(preset("tiny")), tmp_path / "student")
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tmp_path / "student"), "--data", str(tmp_path / "data"), "--iters", "1",
                 "--device", "cpu", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["iters"] == 1 and report["metrics"]["gt/epe"] > 0


def test_ffsc_eval_without_ground_truth_refuses_in_one_line_or_scores_against_a_teacher(tmp_path, capsys) -> None:
    write_synthetic_dataset(tmp_path / "data", 2, CFG, progress=False)
    for gt in (tmp_path / "data").glob("*/disp0GT.pfm"):
        gt.unlink()  # pairs only: no ground truth
    torch.manual_seed(0)
    save_student(build_student(preset("tiny")), tmp_path / "student")
    torch.manual_seed(1)
    save_student(build_student(preset("tiny")), tmp_path / "teacher")
    out = tmp_path / "eval.json"
    base = ["eval", "--model", str(tmp_path / "student"), "--data", str(tmp_path / "data"), "--iters", "1",
            "--device", "cpu", "--json", str(out)]
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ground-truth" in err and "--teacher" in err and not out.exists()
    assert main([*base, "--teacher", str(tmp_path / "teacher"), "--teacher-iters", "1"]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["teacher/epe"] > 0 and not any(k.startswith("gt/") for k in metrics)


def test_ffsc_eval_without_iters_runs_the_models_own_count(tmp_path) -> None:
    write_synthetic_dataset(tmp_path / "data", 1, CFG, progress=False)
    torch.manual_seed(0)
    save_student(build_student(preset("tiny", iters=2)), tmp_path / "student")
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tmp_path / "student"), "--data", str(tmp_path / "data"), "--device", "cpu",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["iters"] == 2  # its cfg.iters, not a guessed 8
