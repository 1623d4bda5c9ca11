"""Study creation, spec checks, storage selection, failing trials and resume on real SQLite/journal storages."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from compress.errors import ConfigError, ExportError
from compress.nas import StudySpec, create_study, describe_storage, make_storage, run_study, trial_counts

optuna.logging.set_verbosity(optuna.logging.ERROR)


def analytic(trial: optuna.Trial) -> dict[str, float]:
    """Cheap 2-objective problem: accuracy improves towards x=1, latency falls with x."""
    x = trial.suggest_float("x", 0.0, 3.0)
    y = trial.suggest_float("y", 0.0, 1.0)
    return {"epe": (x - 1.0) ** 2 + y, "latency_ms": 10.0 / (1.0 + x) + y, "params_m": 1.0 + x}


def test_spec_rejects_inconsistent_settings():
    with pytest.raises(ConfigError, match="one direction per objective"):
        StudySpec("s", metrics=("epe", "latency_ms"), directions=("minimize",))
    with pytest.raises(ConfigError, match="direction"):
        StudySpec("s", directions=("minimize", "lower"))
    with pytest.raises(ConfigError, match="sampler"):
        StudySpec("s", sampler="cmaes")
    with pytest.raises(ConfigError, match="not one of the"):
        StudySpec("s", metrics=("epe", "gflops"), budget_ms=5.0)
    with pytest.raises(ConfigError, match="n_trials"):
        StudySpec("s", n_trials=0)
    with pytest.raises(ConfigError, match="milliseconds"):
        StudySpec("s", budget_ms=-1.0)
    assert StudySpec("s", directions=["MINIMIZE", "maximize"]).directions == ("minimize", "maximize")


def test_make_storage_picks_the_backend_from_the_url(tmp_path):
    default = make_storage(None, tmp_path / "run")
    assert isinstance(default, optuna.storages.RDBStorage)
    assert (tmp_path / "run" / "optuna.db").exists()
    assert default.get_heartbeat_interval() is not None  # killed workers are detected
    journal = make_storage("journal:" + str(tmp_path / "j" / "study.log"), tmp_path / "run")
    assert isinstance(journal, optuna.storages.JournalStorage)
    assert describe_storage(journal).endswith("study.log")
    by_suffix = make_storage(tmp_path / "other.journal", tmp_path / "run")
    assert isinstance(by_suffix, optuna.storages.JournalStorage)
    sqlite_path = make_storage(str(tmp_path / "x.db"), tmp_path / "run")
    assert isinstance(sqlite_path, optuna.storages.RDBStorage) and (tmp_path / "x.db").exists()
    for bad in ("redis://localhost:6379", "http://127.0.0.1:5000", "study.txt"):
        with pytest.raises(ConfigError, match="storage"):
            make_storage(bad, tmp_path / "run")


def test_study_front_is_mutually_non_dominated_and_values_follow_the_spec(tmp_path):
    spec = StudySpec("analytic", sampler="tpe", seed=1, n_trials=14)
    seen = []
    result = run_study(
        spec,
        make_storage(None, tmp_path),
        analytic,
        run_dir=tmp_path,
        on_trial_end=lambda study, trial, front: seen.append((trial.number, len(front.points))),
    )
    study = result.study
    assert result.n_complete == 14 and result.ran == 14 and result.n_failed == 0
    assert [n for n, _ in seen] == list(range(14)) and all(k >= 1 for _, k in seen)
    for t in study.trials:
        metrics = t.user_attrs["metrics"]
        assert t.values == [metrics["epe"], metrics["latency_ms"]]
        assert metrics["params_m"] == pytest.approx(1.0 + t.params["x"])
    pts = np.array([p.values for p in result.front.points])
    assert len(pts) >= 2
    for i in range(len(pts)):
        for j in range(len(pts)):
            assert not (np.all(pts[j] <= pts[i]) and np.any(pts[j] < pts[i]))
    # Every complete trial off the front is dominated by a front point.
    on_front = {p.number for p in result.front.points}
    for t in study.trials:
        if t.number not in on_front:
            v = np.array(t.values)
            assert any(np.all(f <= v) and np.any(f < v) for f in pts)
    assert {f.name for f in result.files} == {"pareto_front.csv", "pareto_front.json", "pareto_front.png"}


def test_objective_exceptions_fail_the_trial_with_a_reason_and_the_study_goes_on(tmp_path, capsys):
    torch = pytest.importorskip("torch")

    def flaky(trial: optuna.Trial) -> dict[str, float]:
        metrics = analytic(trial)
        if trial.number == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if trial.number == 3:
            raise ExportError("ONNX export failed: unsupported operator grid_sampler")
        if trial.number == 4:
            metrics["epe"] = math.nan
        return metrics

    result = run_study(StudySpec("flaky", sampler="random", n_trials=8), make_storage(None, tmp_path), flaky)
    trials = {t.number: t for t in result.study.trials}
    assert len(trials) == 8 and result.n_complete == 5 and result.n_failed == 3
    assert trials[1].state == TrialState.FAIL and "out of memory" in trials[1].user_attrs["fail_reason"]
    assert trials[1].user_attrs["fail_reason"].startswith("OutOfMemoryError")
    assert "grid_sampler" in trials[3].user_attrs["fail_reason"]
    assert "epe=nan" in trials[4].user_attrs["fail_reason"]
    assert {t.number for t in result.study.trials if t.state == TrialState.COMPLETE} == {0, 2, 5, 6, 7}
    assert all(p.number not in (1, 3, 4) for p in result.front.points)
    # Output captured is not a terminal: one plain line per trial (no carriage-return redraws), naming it.
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("NAS flaky:")]
    assert "\r" not in "".join(lines) and any("8/8" in line for line in lines)
    assert all(f"trial {n} " in "".join(lines) for n in range(8)) and "trial 1 fail" in "".join(lines)


def test_objective_breaking_the_metrics_contract_stops_the_study(tmp_path):
    def incomplete(trial: optuna.Trial) -> dict[str, float]:
        return {"epe": trial.suggest_float("x", 0, 1)}

    storage = make_storage(None, tmp_path)
    with pytest.raises(ConfigError, match="latency_ms"):
        run_study(StudySpec("contract", n_trials=5), storage, incomplete)
    study = optuna.load_study(study_name="contract", storage=storage)
    assert len(study.trials) == 1 and study.trials[0].state == TrialState.FAIL
    # The failure is the caller's bug, not the trial's: it does not use up the budget.
    assert trial_counts(study)["counted"] == 0


def test_rerun_only_runs_the_missing_trials_and_says_where_it_resumes(tmp_path, capsys):
    storage = make_storage("journal:" + str(tmp_path / "study.log"), tmp_path)
    spec = StudySpec("resume", sampler="random", seed=3, n_trials=5)
    first = run_study(spec, storage, analytic)
    assert first.ran == 5
    again = run_study(spec, storage, analytic)
    assert again.ran == 0 and again.n_complete == 5
    assert "resuming" not in capsys.readouterr().out  # a fresh study and a finished one: nothing to resume
    more = run_study(spec, storage, analytic, n_trials=8)
    assert more.ran == 3 and more.n_complete == 8
    assert "search: 5 of 8 trials done, resuming\n" in capsys.readouterr().out
    params = [(t.params["x"], t.params["y"]) for t in more.study.trials]
    assert len(set(params)) == 8  # the resumed sampler does not replay the first run's random sequence


def test_same_seed_reproduces_a_fresh_study(tmp_path):
    spec = StudySpec("seeded", sampler="random", seed=11, n_trials=4)
    a = run_study(spec, make_storage(None, tmp_path / "a"), analytic)
    b = run_study(spec, make_storage(None, tmp_path / "b"), analytic)
    assert [t.params for t in a.study.trials] == [t.params for t in b.study.trials]


def test_joining_a_study_with_other_objectives_or_budget_is_refused(tmp_path):
    storage = make_storage(None, tmp_path)
    create_study(StudySpec("fixed", budget_ms=5.0), storage)
    with pytest.raises(ConfigError, match="directions"):
        create_study(StudySpec("fixed", directions=("maximize", "minimize"), budget_ms=5.0), storage)
    with pytest.raises(ConfigError, match="metrics"):
        create_study(StudySpec("fixed", metrics=("d1", "latency_ms"), budget_ms=5.0), storage)
    with pytest.raises(ConfigError, match="budget_ms"):
        create_study(StudySpec("fixed", budget_ms=9.0), storage)
    joined = create_study(StudySpec("fixed", budget_ms=5.0, n_trials=99), storage)
    assert joined.user_attrs["ffsc.spec"]["n_trials"] == 50  # the creator's spec stays recorded


@pytest.mark.parametrize("sampler", ["nsga2", "tpe"])
def test_budget_constraint_reaches_the_sampler_and_the_front(tmp_path, sampler):
    spec = StudySpec(f"budget-{sampler}", sampler=sampler, seed=0, n_trials=12, budget_ms=4.0)
    result = run_study(spec, make_storage(None, tmp_path), analytic)
    for t in result.study.trials:
        excess = t.user_attrs["metrics"]["latency_ms"] - 4.0
        if hasattr(t, "constraints"):  # Optuna >= 5 stores per-trial constraints for the samplers
            assert t.constraints["latency_budget"] == pytest.approx(excess)
        assert t.user_attrs["constraint"] == [pytest.approx(excess)]
    assert result.front.points and all(p.metrics["latency_ms"] <= 4.0 for p in result.front.points)
