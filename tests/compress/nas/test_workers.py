"""Several worker processes on one study, and a killed worker resumed: real processes, real storages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from compress.nas import StudySpec, make_storage, run_study, trial_counts
from tests.paths import REPO

optuna.logging.set_verbosity(optuna.logging.ERROR)

REPO_ROOT = REPO

WORKER = """
import json, sys, time
from pathlib import Path

import optuna

from compress.nas import StudySpec, make_storage, run_study

optuna.logging.set_verbosity(optuna.logging.ERROR)
cfg = json.loads(sys.argv[1])


def objective(trial):
    x = trial.suggest_float("x", 0.0, 3.0)
    y = trial.suggest_float("y", 0.0, 1.0)
    if trial.number == cfg.get("hang_on"):
        time.sleep(600)  # stands in for a long trial during which the worker gets killed
    time.sleep(cfg["sleep"])
    return {"epe": (x - 1.0) ** 2 + y, "latency_ms": 10.0 / (1.0 + x) + y}


storage = make_storage(cfg["storage"], cfg["run_dir"])
spec = StudySpec(cfg["study"], sampler="tpe", seed=0, n_trials=cfg["n_trials"])
if cfg.get("barrier"):
    # Start the workers' studies together so that they really compete for trials.
    Path(cfg["barrier"], "ready-" + cfg["worker"]).touch()
    while not Path(cfg["barrier"], "go").exists():
        time.sleep(0.02)
run_study(spec, storage, objective, worker_id=cfg["worker"], run_dir=cfg["run_dir"], poll_interval_s=0.2,
          plot_every=0)
"""


def _spawn(tmp_path: Path, **cfg) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    if not script.exists():
        script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    log_path = tmp_path / f"worker-{cfg['worker']}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(script), json.dumps(cfg)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 90) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    log = proc.log_path.read_text()  # type: ignore[attr-defined]
    assert rc == 0, f"worker exited with {rc}:\n{log[-3000:]}"


def _run_workers(tmp_path: Path, storage_url: str, study: str, n_trials: int, n_workers: int = 2) -> None:
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [
        _spawn(
            tmp_path,
            storage=storage_url,
            run_dir=str(tmp_path / "run"),
            study=study,
            n_trials=n_trials,
            worker=f"w{i}",
            sleep=0.15,
            barrier=str(barrier),
        )
        for i in range(n_workers)
    ]
    deadline = time.monotonic() + 60
    while len(list(barrier.glob("ready-*"))) < n_workers:
        assert all(p.poll() is None for p in procs), "a worker died during start-up"
        assert time.monotonic() < deadline, "workers did not get ready within 60 s"
        time.sleep(0.05)
    (barrier / "go").touch()
    for p in procs:
        _finish(p)


def _assert_shared_exactly(study: optuna.Study, n_trials: int, n_workers: int) -> None:
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert len(set(numbers)) == len(numbers) == len(trials)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n_trials
    # Anything else can only be a trial handed back because another worker took the last slot.
    for t in trials:
        assert t.state == TrialState.COMPLETE or (t.state == TrialState.PRUNED and "skipped" in t.user_attrs)
    workers = {t.user_attrs["worker"]["id"] for t in complete}
    assert workers == {f"w{i}" for i in range(n_workers)}
    assert len({t.user_attrs["worker"]["pid"] for t in complete}) == n_workers
    assert trial_counts(study)["counted"] == n_trials


def test_two_worker_processes_share_a_journal_study_without_losing_trials(tmp_path):
    journal = tmp_path / "run" / "study.journal.log"
    _run_workers(tmp_path, f"journal:{journal}", "shared", n_trials=12)
    study = optuna.load_study(study_name="shared", storage=make_storage(f"journal:{journal}", tmp_path / "run"))
    _assert_shared_exactly(study, 12, 2)
    assert json.loads((tmp_path / "run" / "pareto_front.json").read_text())["n_complete"] == 12


@pytest.mark.parametrize("backend", ["sqlite", "journal"])
def test_killed_worker_resumes_to_exactly_the_requested_trials(tmp_path, backend):
    run_dir = tmp_path / "run"
    url = "" if backend == "sqlite" else f"journal:{run_dir / 'study.journal.log'}"
    n_trials, hang_on = 8, 4
    proc = _spawn(
        tmp_path,
        storage=url,
        run_dir=str(run_dir),
        study="killed",
        n_trials=n_trials,
        worker="victim",
        sleep=0.02,
        hang_on=hang_on,
    )
    storage = None
    deadline = time.monotonic() + 60
    try:
        while True:
            assert proc.poll() is None, (tmp_path / "worker-victim.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the worker never reached the trial it hangs on"
            if storage is None and (run_dir / ("optuna.db" if backend == "sqlite" else "study.journal.log")).exists():
                storage = make_storage(url or None, run_dir)
            if storage is not None:
                try:
                    trials = optuna.load_study(study_name="killed", storage=storage).get_trials()
                except KeyError:
                    trials = []  # the study is not created yet
                # Wait until the trial has its architecture sampled, so the retry can be compared.
                hung = [t for t in trials if t.number == hang_on and len(t.params) == 2]
                if hung and hung[0].state == TrialState.RUNNING:
                    break
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    before = optuna.load_study(study_name="killed", storage=storage).get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in before) == hang_on
    assert [t.number for t in before if t.state == TrialState.RUNNING] == [hang_on]

    def fast(trial: optuna.Trial) -> dict[str, float]:
        x = trial.suggest_float("x", 0.0, 3.0)
        y = trial.suggest_float("y", 0.0, 1.0)
        return {"epe": (x - 1.0) ** 2 + y, "latency_ms": 10.0 / (1.0 + x) + y}

    spec = StudySpec("killed", sampler="tpe", seed=0, n_trials=n_trials)
    result = run_study(spec, storage, fast, run_dir=run_dir, plot_every=0)
    trials = result.study.get_trials()
    assert result.n_complete == n_trials and trial_counts(result.study)["counted"] == n_trials
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    killed = trials[hang_on]
    assert killed.state == TrialState.FAIL and "fail_reason" not in killed.user_attrs
    # The interrupted architecture is evaluated again, not silently dropped.
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == hang_on]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == killed.params
    assert result.ran == n_trials - hang_on


def test_two_worker_processes_share_a_postgresql_study(tmp_path, postgres_url):
    study_name = f"pg-{uuid.uuid4().hex[:12]}"
    storage = make_storage(postgres_url, tmp_path / "run")
    try:
        _run_workers(tmp_path, postgres_url, study_name, n_trials=10)
        _assert_shared_exactly(optuna.load_study(study_name=study_name, storage=storage), 10, 2)
    finally:
        try:
            optuna.delete_study(study_name=study_name, storage=storage)
        except KeyError:
            pass


OPENER = """
import sys, time

from compress.nas import make_storage

start_at = float(sys.argv[2])
while time.time() < start_at:
    time.sleep(0.001)
make_storage(sys.argv[1], sys.argv[3])
"""


def test_workers_creating_a_new_sqlite_database_together_all_succeed(tmp_path):
    script = tmp_path / "opener.py"
    script.write_text(OPENER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    start_at = time.time() + 3.0  # after every interpreter has imported optuna
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), "", str(start_at), str(tmp_path / "run")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=90)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(outputs)[-3000:]
    study = optuna.create_study(storage=make_storage(None, tmp_path / "run"))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert len(study.trials) == 2
