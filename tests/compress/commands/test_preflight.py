"""Every entry point checks what it cheaply can before any work: one line, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compress.cli import main
from tests.paths import REPO

QUICKSTART = str(REPO / "recipes" / "quickstart_cpu.yaml")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks refusals on a machine without CUDA")


def _fails(capsys, argv: list[str], *expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, err
    return err


def _nan_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "damaged" / "model_best_bp2.pth"
    path.parent.mkdir()
    torch.save({"model": {"feature.w": torch.zeros(4), "refine.w": torch.tensor([0.0, float("nan")])}}, path)
    (path.parent / "cfg.yaml").write_text("vit_size: vits\n")
    return path


def _run(capsys, tmp_path: Path, *overrides: str, expected: tuple[str, ...]) -> None:
    run_dir = tmp_path / "run"
    _fails(capsys, ["run", QUICKSTART, f"run_dir={run_dir}", *overrides], *expected)
    assert not run_dir.exists()


def test_run_negative_budget(capsys, tmp_path) -> None:
    _run(capsys, tmp_path, "search.budget_ms=-5", expected=("search.budget_ms=-5", "expected a number > 0"))


def test_run_zero_teacher_steps(capsys, tmp_path) -> None:
    _run(capsys, tmp_path, "teacher.train.steps=0", expected=("teacher.train.steps=0", "expected an integer >= 1"))


def test_run_zero_trials(capsys, tmp_path) -> None:
    _run(capsys, tmp_path, "search.n_trials=0", expected=("search.n_trials=0",))


def test_run_unknown_export_format(capsys, tmp_path) -> None:
    _run(capsys, tmp_path, "export.formats=[onnx,onnx_int4]", expected=("export.formats", "onnx_int4"))


@no_cuda
def test_run_tensorrt_backend_missing(capsys, tmp_path) -> None:
    _run(capsys, tmp_path, "search.latency.backend=tensorrt", expected=("search.latency.backend='tensorrt'",))


@no_cuda
def test_run_cuda_device_missing(capsys, tmp_path) -> None:
    _run(capsys, tmp_path, "device=cuda", expected=("cuda",))


def test_run_fp16_torch_on_cpu(capsys, tmp_path) -> None:
    _run(capsys, tmp_path, "search.latency.backend=torch", "search.latency.device=cpu",
         "search.latency.precision=fp16", expected=("CPU autocast has no fp16",))


def test_run_damaged_teacher_checkpoint(capsys, tmp_path) -> None:
    ckpt = _nan_checkpoint(tmp_path)
    _run(capsys, tmp_path, f"teacher.checkpoint={ckpt}", expected=("'refine.w' holds 1 NaN/Inf",))


def test_run_missing_data_folder(capsys, tmp_path) -> None:
    _run(capsys, tmp_path, f"data.train.path={tmp_path / 'nowhere'}", "data.train.kind=auto",
         expected=("data.train.path", "is not a folder"))


def test_run_dir_under_a_file(capsys, tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    _fails(capsys, ["run", QUICKSTART, f"run_dir={tmp_path / 'file' / 'run'}"], "run_dir:", "is a file")


def test_nas_checks_before_creating_the_study(capsys, tmp_path) -> None:
    _fails(capsys, ["nas", QUICKSTART, "search.budget_ms=0", "--run-dir", str(tmp_path / "run")], "search.budget_ms")
    assert not (tmp_path / "run").exists()


@no_cuda
def test_prune_latency_budget_with_tensorrt_missing(capsys, tmp_path) -> None:
    _fails(capsys, ["prune", "--model", "preset:tiny", "--budget-ms", "5", "--backend", "tensorrt",
                    "--out", str(tmp_path / "out"), "--no-progress"], "latency.backend='tensorrt'")
    assert not (tmp_path / "out").exists()


def test_prune_missing_model_and_data(capsys, tmp_path) -> None:
    _fails(capsys, ["prune", "--model", str(tmp_path / "nope"), "--ratio", "0.3", "--out", str(tmp_path / "out")],
           "--model", "no such file or directory")
    _fails(capsys, ["prune", "--model", "preset:tiny", "--ratio", "0.3", "--data", str(tmp_path / "nope"),
                    "--out", str(tmp_path / "out")], "--data", "is not a folder")
    assert not (tmp_path / "out").exists()


def test_prune_unwritable_out(capsys, tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    _fails(capsys, ["prune", "--model", "preset:tiny", "--ratio", "0.3", "--out", str(tmp_path / "file" / "out")],
           "--out", "is a file")


def test_distill_damaged_teacher(capsys, tmp_path) -> None:
    ckpt = _nan_checkpoint(tmp_path)
    _fails(capsys, ["distill", str(REPO / "recipes" / "distill.yaml"), f"run_dir={tmp_path / 'd'}",
                    f"teacher.checkpoint={ckpt}", "data.labels.folder=null"], "'refine.w' holds 1 NaN/Inf")
    assert not (tmp_path / "d").exists()


def test_export_unwritable_out_fails_before_exporting(capsys) -> None:
    _fails(capsys, ["export", "--model", "preset:tiny", "--height", "64", "--width", "128",
                    "--out", "/proc/ffsc-student.onnx"], "--out", "not writable")


def test_export_damaged_checkpoint(capsys, tmp_path) -> None:
    ckpt = _nan_checkpoint(tmp_path)
    _fails(capsys, ["export", "--model", str(ckpt), "--height", "64", "--width", "128",
                    "--out", str(tmp_path / "m.onnx")], "'refine.w' holds 1 NaN/Inf")


def test_run_onnxruntime_bf16_and_thread_clock(capsys, tmp_path) -> None:
    _run(capsys, tmp_path, "search.latency.precision=bf16", expected=("search.latency.precision='bf16'",))
    _run(capsys, tmp_path, "search.latency.clock=thread", "search.latency.threads=2",
         expected=("search.latency.clock", "single-threaded"))


def test_run_zero_height(capsys, tmp_path) -> None:
    _run(capsys, tmp_path, "height=0", expected=("height=0", "expected an integer >= 32"))


def test_run_path_with_synthetic_kind(capsys, tmp_path) -> None:
    _run(capsys, tmp_path, f"data.train.path={tmp_path}", expected=("kind 'synthetic'", "set kind to 'auto'"))


def test_run_damaged_predictor_table(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FFSC_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "latency_table.json").write_text("{not json")
    _run(capsys, tmp_path, "search.latency.mode=predicted", expected=("latency table", "not readable JSON"))
