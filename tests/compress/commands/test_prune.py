"""``ffsc prune``: a run to a parameter budget on a dataset folder, and one-line errors for user mistakes."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import yaml

from compress.cli import main
from compress.commands.prune import recovery_verdict
from compress.data import SyntheticConfig, write_synthetic_dataset
from compress.run_lock import RunDirLock
from search_spaces import build_student, count_params, preset
from search_spaces.serialization import load_model

COMMON = ["--height", "64", "--width", "128", "--distill-steps", "1", "--recovery-steps", "1", "--samples", "2",
          "--train-iters", "2", "--teacher-iters", "2", "--no-progress", "data.eval_samples=1",
          "importance.calibration_batches=1"]


def test_cli_prunes_to_a_parameter_budget(tmp_path, capsys):
    data = tmp_path / "data"
    write_synthetic_dataset(data, 2, SyntheticConfig(height=70, width=140, max_disp=16), progress=False)
    params = count_params(build_student(preset("tiny")))
    budget = 0.85 * params / 1e6
    out = tmp_path / "run"
    rc = main(["prune", "--model", "preset:tiny", "--budget-mparams", str(budget), "--out", str(out),
               "--data", str(data), "--scope", "refinement,cost_filtering", "--importance", "taylor",
               "--step-ratio", "0.2", *COMMON])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "budget mparams" in printed and "met" in printed and "parameters (M)" in printed
    result = json.loads((out / "prune_result.json").read_text())
    assert result["met"] and result["final"]["mparams"] <= budget < result["initial"]["mparams"]
    assert result["config"]["data"]["path"] == str(data) and result["config"]["importance"]["method"] == "taylor"
    saved_cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert saved_cfg["budget_mparams"] == pytest.approx(budget) and saved_cfg["scope"] == ["refinement",
                                                                                              "cost_filtering"]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows][0] == "baseline" and rows[-1]["kind"] == "end" and rows[-1]["met"] is True
    model = load_model(out / "model")
    assert count_params(model) / 1e6 == pytest.approx(result["final"]["mparams"])
    _check_mlflow_run(out, result)
    with torch.no_grad():
        disp = model(255 * torch.rand(1, 3, 64, 128), 255 * torch.rand(1, 3, 64, 128), test_mode=True)
    assert disp.shape == (1, 1, 64, 128)


def _check_mlflow_run(out, result) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ffsc").experiment_id])
    assert run.data.tags["ffsc.role"] == "prune" and run.info.status == "FINISHED"
    assert run.data.params["budget_mparams"] == str(result["config"]["budget_mparams"])
    assert run.data.metrics["met"] == 1.0 and run.data.metrics["final_mparams"] == pytest.approx(
        result["final"]["mparams"])
    history = client.get_metric_history(run.info.run_id, "prune/step/mparams")
    assert [m.step for m in history] == list(range(1, len(result["steps"]) + 1))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"prune_result.json", "model"} <= artifacts


def test_cli_reports_an_unmet_budget(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["prune", "--model", "preset:tiny", "--budget-gmacs", "0.001", "--max-steps", "1", "--out", str(out),
               "--importance", "random", "--scope", "refinement", "--height", "64", "--width", "128",
               "--distill-steps", "0", "--recovery-steps", "0", "--samples", "1", "--teacher-iters", "1",
               "--no-progress", "data.eval_samples=0"])
    assert rc == 1
    assert "NOT met" in capsys.readouterr().out
    assert json.loads((out / "prune_result.json").read_text())["met"] is False
    # A second prune into the same folder is a run of its own in MLflow, with its own params.
    argv = ["prune", "--model", "preset:tiny", "--budget-mparams", "1000", "--out", str(out), "--height", "64",
            "--width", "128", "--distill-steps", "0", "--recovery-steps", "0", "--samples", "1",
            "--teacher-iters", "1", "--no-progress", "data.eval_samples=0"]
    time.sleep(1.1)  # run names carry the second they start
    assert main(argv) == 0
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ffsc").experiment_id], order_by=["start_time ASC"])
    assert len(runs) == 2 and [r.data.metrics["met"] for r in runs] == [0.0, 1.0]
    assert "budget_gmacs" in runs[0].data.params and runs[1].data.params["budget_mparams"] == "1000.0"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budget-ms", "5", "--budget-gmacs", "1"], "pass one budget"),
        ([], "no budget"),
        (["--budget-gmacs", "1", "--scope", "refinement,decoder"], "scope"),
        (["--budget-gmacs", "1", "--step-ratio", "1.5"], "step_ratio"),
    ],
)
def test_cli_user_mistakes_are_one_line_errors(argv, message, capsys, tmp_path):
    rc = main(["prune", "--model", "preset:tiny", "--out", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_missing_model_is_a_checkpoint_error(tmp_path, capsys):
    rc = main(["prune", "--model", str(tmp_path / "nowhere"), "--budget-gmacs", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "no such file or directory" in err


@pytest.mark.parametrize("before, after, verdict", [
    (28.0, 50.1, "NOT recovered: worse after the recovery"),  # the 35.0 -> 28.0 -> 50.1
    (28.0, 20.0, "recovered"),
    (28.0, 27.5, "barely changed"),  # within 5%
    (28.0, 28.0, "barely changed"),
])
def test_the_recovery_verdict_says_when_the_error_rose(before: float, after: float, verdict: str) -> None:
    assert recovery_verdict(before, after) == verdict


# ------------------------------------------------------------------ a failed prune leaves a finished one as it was

QUICK = ["--height", "64", "--width", "128", "--distill-steps", "0", "--recovery-steps", "0", "--samples", "1",
         "--teacher-iters", "1", "--no-progress", "data.eval_samples=0"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A folder holding a finished prune of preset:tiny (MLflow store included)."""
    out = tmp_path_factory.mktemp("prune") / "done"
    assert main(["prune", "--model", "preset:tiny", "--budget-mparams", "1000", "--out", str(out), *QUICK]) == 0
    assert (out / "prune_result.json").is_file() and (out / "mlflow.db").is_file()
    return out


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("argv, message", [
    (["--model", "preset:tinny"], "--model 'tinny' is not a saved student"),
    (["--model", "preset:tiny", "--teacher", "tinny"], "--teacher 'tinny' is not a saved student"),
    (["--model", "teacher:vitx"], "--model 'teacher:vitx': unknown ViT size 'vitx'"),
    (["--model", "teacher:vits", "--scope", "backbone"], "scope backbone cannot be pruned on a teacher"),
    (["--model", "preset:tiny", "--teacher", "nowhere/t.pth"], "--teacher nowhere/t.pth: no such file"),
])
def test_failed_prune_leaves_a_finished_prune_byte_identical(finished, tmp_path, capsys, argv, message):
    before = _snapshot(finished)
    capsys.readouterr()
    started = time.perf_counter()
    assert main(["prune", *argv, "--budget-mparams", "1000", "--out", str(finished), *QUICK]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert _snapshot(finished) == before
    assert time.perf_counter() - started < 10  # refused before any data is labelled
    # In a fresh folder nothing is made at all (no MLflow store, no config.yaml).
    assert main(["prune", *argv, "--budget-mparams", "1000", "--out", str(tmp_path / "new"), *QUICK]) == 2
    assert not (tmp_path / "new").exists()


def test_a_second_prune_on_a_busy_folder_is_refused(finished, capsys):
    with RunDirLock(finished):  # another prune holds the folder (this process, as far as the lock can tell)
        before = _snapshot(finished)
        capsys.readouterr()
        rc = main(["prune", "--model", "preset:tiny", "--budget-mparams", "1000", "--out", str(finished), *QUICK])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, err
        assert f"run directory {finished} is in use by process {os.getpid()}" in err and "resumes" not in err
        assert _snapshot(finished) == before
    # Released: the next prune works, and does not announce a take-over (the lock was let go, not left).
    assert main(["prune", "--model", "preset:tiny", "--budget-mparams", "1000", "--out", str(finished), *QUICK]) == 0
    assert "taking over" not in capsys.readouterr().out
