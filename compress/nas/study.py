"""Run a multi-objective Optuna study against an objective that returns named metrics: the trials, the front on
disk after each, and their MLflow runs (creating the study: compress.nas.spec; its workers: compress.nas.workers)."""

from __future__ import annotations

import gc
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.errors import ConfigError
from compress.nas.pareto import (
    CONSTRAINT_ATTR,
    FAIL_REASON_ATTR,
    FRONT_CSV,
    FRONT_JSON,
    FRONT_PNG,
    METRICS_ATTR,
    ParetoFront,
    front_from_study,
    plot_front,
    write_front,
)
from compress.nas.spec import UID_ATTR, StudySpec, _has_set_constraint, create_study, derive_seed
from compress.nas.storage import describe_storage, heartbeat_enabled
from compress.nas.workers import (
    SKIPPED_ATTR,
    WORKER_ATTR,
    WorkerIdentity,
    _counts_toward_budget,
    process_alive,
    reap_dead_trials,
    trial_counts,
)
from compress.terminal import console, progress_bar

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial, Trial

    from compress.tracking import Tracker

# optuna itself is imported where a study runs: importing compress.nas stays cheap (see its docstring).

_log = logging.getLogger(__name__)

PARENT_RUN_ATTR = "mlflow_parent_run_id"
ABORTED_ATTR = "aborted"
CONSTRAINT_NAME = "latency_budget"
_MAX_REASON_CHARS = 2000

Objective = Callable[["Trial"], Mapping[str, float]]
TrialEndHook = Callable[["optuna.Study", "FrozenTrial", ParetoFront], None]

__all__ = ["METRICS_ATTR", "UID_ATTR", "StudyResult", "StudySpec", "WorkerIdentity", "create_study", "derive_seed",
           "process_alive", "reap_dead_trials", "run_study", "trial_counts"]


@dataclass
class StudyResult:
    """What run_study did: the study, its current front and the trial counts after this call."""

    study: optuna.Study
    front: ParetoFront
    n_complete: int
    n_failed: int
    n_counted: int
    ran: int
    files: list[Path] = field(default_factory=list)



def _short_reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."


def _release_accelerator_memory(exc: BaseException) -> None:
    torch = sys.modules.get("torch")
    if torch is not None and type(exc).__name__ == "OutOfMemoryError":
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class _TrialRunner:
    """The per-trial logic of run_study: budget slot, owner, objective call, metrics and constraint."""

    def __init__(
        self,
        spec: StudySpec,
        study: optuna.Study,
        objective: Objective,
        n_total: int,
        identity: WorkerIdentity,
    ) -> None:
        self.spec = spec
        self.study = study
        self.objective = objective
        self.n_total = n_total
        self.identity = identity
        self.contract_error: ConfigError | None = None
        self.set_constraint = _has_set_constraint()

    def _slots_ahead(self, number: int) -> int:
        ahead = 0
        for t in self.study.get_trials(deepcopy=False):
            if t.number >= number:
                continue
            ahead += _counts_toward_budget(t) or t.state.name in ("RUNNING", "WAITING")
        return ahead

    def _abort(self, trial: Trial, error: ConfigError) -> ConfigError:
        trial.set_user_attr(ABORTED_ATTR, str(error))
        self.contract_error = error
        self.study.stop()
        return error

    def _metrics(self, trial: Trial, raw: Any) -> dict[str, float]:
        if not isinstance(raw, Mapping):
            raise self._abort(
                trial,
                ConfigError(
                    f"the NAS objective returned {type(raw).__name__}; expected a dict of metric name -> float "
                    f"containing the objectives {list(self.spec.metrics)}"
                ),
            )
        missing = [m for m in self.spec.metrics if m not in raw]
        if missing:
            raise self._abort(
                trial,
                ConfigError(
                    f"the NAS objective returned metrics {sorted(map(str, raw))} without {missing}; "
                    f"it must return every objective of the study {list(self.spec.metrics)}"
                ),
            )
        metrics: dict[str, float] = {}
        for key, value in raw.items():
            try:
                metrics[str(key)] = float(value)
            except (TypeError, ValueError):
                raise self._abort(
                    trial, ConfigError(f"the NAS objective returned {key!r}={value!r}, which is not a number")
                ) from None
        return metrics

    def __call__(self, trial: Trial) -> list[float]:
        import optuna

        if self._slots_ahead(trial.number) >= self.n_total:
            # Another worker took the last slot between our count and ask(); give this trial back.
            trial.set_user_attr(SKIPPED_ATTR, f"all {self.n_total} trials already taken by other workers")
            raise optuna.TrialPruned("trial budget already taken by other workers")
        trial.set_user_attr(WORKER_ATTR, self.identity.attr(trial.number))
        try:
            raw = self.objective(trial)
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            trial.set_user_attr(FAIL_REASON_ATTR, _short_reason(exc))
            _release_accelerator_memory(exc)
            raise
        metrics = self._metrics(trial, raw)
        trial.set_user_attr(METRICS_ATTR, {k: (v if math.isfinite(v) else None) for k, v in metrics.items()})
        bad = [m for m in self.spec.metrics if not math.isfinite(metrics[m])]
        if bad:
            reason = "objective value(s) not finite: " + ", ".join(f"{m}={metrics[m]}" for m in bad)
            trial.set_user_attr(FAIL_REASON_ATTR, reason)
            raise FloatingPointError(reason)
        if self.spec.budget_ms is not None:
            excess = metrics[self.spec.budget_metric] - self.spec.budget_ms
            trial.set_user_attr(CONSTRAINT_ATTR, [excess])
            if self.set_constraint:
                trial.set_constraint(CONSTRAINT_NAME, excess)
        return [metrics[m] for m in self.spec.metrics]


def _default_plot_axes(spec: StudySpec) -> tuple[str, str] | None:
    if len(spec.metrics) < 2:
        return None
    x = spec.budget_metric if spec.budget_metric in spec.metrics else spec.metrics[-1]
    y = next(m for m in spec.metrics if m != x)
    return x, y


def _trial_tags(trial: FrozenTrial, worker_id: str | None) -> dict[str, str]:
    tags = {"ffsc.state": trial.state.name}
    if worker_id is not None:
        tags["ffsc.worker"] = worker_id
    for key in (FAIL_REASON_ATTR, ABORTED_ATTR):
        if key in trial.user_attrs:
            tags[f"ffsc.{key}"] = str(trial.user_attrs[key])
    if CONSTRAINT_ATTR in trial.user_attrs:
        tags["ffsc.feasible"] = str(all(v <= 0 for v in trial.user_attrs[CONSTRAINT_ATTR]))
    return tags


def run_study(
    spec: StudySpec,
    storage: BaseStorage,
    objective: Objective,
    n_trials: int | None = None,
    worker_id: str | None = None,
    tracker: Tracker | None = None,
    on_trial_end: TrialEndHook | None = None,
    *,
    run_dir: str | os.PathLike[str] | None = None,
    plot_every: int = 10,
    wait_for_others: bool = True,
    poll_interval_s: float = 1.0,
    max_retry: int | None = 2,
    run_tags: Mapping[str, str] | None = None,
) -> StudyResult:
    """Run trials until the study holds `n_trials` (default spec.n_trials) finished trials, across all workers.

    `objective(trial)` returns metric name -> float including every objective of the spec. Finished
    trials already in storage count, so a re-run after a kill only runs what is missing; trials a dead
    process left RUNNING are failed and re-enqueued. An exception in the objective fails that trial
    (reason in user attr `fail_reason`) and the study goes on. After each trial the feasible Pareto front
    is written to `run_dir` (default: the tracker's run dir) and `on_trial_end(study, trial, front)` runs.
    With a `tracker`, the study's MLflow parent run is opened here and ended here, unless the caller holds the
    tracker (`with tracker:`): then the caller logs into it after the study and its block ends it.
    """
    import optuna

    n_total = spec.n_trials if n_trials is None else n_trials
    if isinstance(n_total, bool) or int(n_total) != n_total or n_total < 1:
        raise ConfigError(f"n_trials is {n_trials!r}; expected a positive integer")
    n_total = int(n_total)
    out_dir = Path(run_dir) if run_dir is not None else (tracker.run_dir if tracker is not None else None)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    study = create_study(spec, storage, worker_id=worker_id)
    identity = WorkerIdentity.current(worker_id)
    runner = _TrialRunner(spec, study, objective, n_total, identity)
    axes = _default_plot_axes(spec)
    files: list[Path] = []

    if tracker is not None:
        tags = {"ffsc.storage": describe_storage(storage), "ffsc.n_trials": str(n_total), **(run_tags or {})}
        parent = tracker.start_study_run(
            spec.name,
            params={**spec.to_dict(), "n_trials": n_total},
            tags=tags,
            study_key=study.user_attrs.get(UID_ATTR),
        )
        if study.user_attrs.get(PARENT_RUN_ATTR) != parent:
            study.set_user_attr(PARENT_RUN_ATTR, parent)

    def write_outputs(plot: bool) -> ParetoFront:
        front = front_from_study(study)
        if out_dir is not None:
            files[:] = list(write_front(front, out_dir))
            if plot and axes is not None and front.n_complete:
                files.append(plot_front(study, out_dir / FRONT_PNG, x=axes[0], y=axes[1]))
        return front

    counts = trial_counts(study)
    if 0 < counts["counted"] < n_total:  # said even without progress: where a resumed search goes on from
        console().print(f"search: {counts['counted']} of {n_total} trials done, resuming", markup=False,
                        soft_wrap=True)
    ran = 0
    progress = progress_bar(
        total=n_total, initial=min(counts["counted"], n_total), desc=f"NAS {spec.name}", unit="trial", every_s=0
    )

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        nonlocal ran
        if SKIPPED_ATTR not in trial.user_attrs:
            ran += 1
            if tracker is not None:
                _track_trial(tracker, spec, trial, worker_id)
            front = write_outputs(plot=plot_every > 0 and ran % plot_every == 0)
            if on_trial_end is not None:
                on_trial_end(study, trial, front)
        now = trial_counts(study)
        progress.n = min(now["counted"], n_total)
        values = "" if trial.values is None else " " + ", ".join(f"{v:.4g}" for v in trial.values)
        progress.set_postfix_str(f"last: trial {trial.number} {trial.state.name.lower()}{values}", refresh=False)
        progress.refresh()
        if now["counted"] + now["running"] >= n_total:
            study.stop()

    deadline = None if spec.timeout is None else time.monotonic() + spec.timeout
    status = "FINISHED"
    try:
        while True:
            reap_dead_trials(study, storage, max_retry)
            counts = trial_counts(study)
            if counts["counted"] >= n_total:
                break
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                _log.info("study %s: timeout reached with %d/%d trials", spec.name, counts["counted"], n_total)
                break
            if counts["counted"] + counts["running"] >= n_total:
                if not wait_for_others:
                    break
                # The remaining trials run in other workers; stay to pick up any that get re-enqueued.
                if heartbeat_enabled(storage):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        optuna.storages.fail_stale_trials(study)
                time.sleep(poll_interval_s)
                continue
            study.optimize(runner, timeout=remaining, callbacks=[after_trial], catch=(Exception,), gc_after_trial=False)
            if runner.contract_error is not None:
                raise runner.contract_error
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        raise
    finally:
        progress.close()
        front = write_outputs(plot=True)
        counts = trial_counts(study)
        if tracker is not None:
            try:
                if out_dir is not None:
                    files = [out_dir / name for name in (FRONT_CSV, FRONT_JSON, FRONT_PNG)]
                    tracker.log_files([f for f in files if f.exists()], "pareto")
                tracker.log_metrics(
                    {"n_complete": counts["complete"], "n_failed": counts["failed"], "front_size": len(front.points)}
                )
            except Exception as exc:  # tracking must never cost the study its results
                _log.warning("could not log the Pareto front to MLflow: %s", exc)
            if not tracker.held:  # a caller holding the tracker logs more into the study run and ends it itself
                tracker.end(status)
    return StudyResult(
        study=study,
        front=front,
        n_complete=counts["complete"],
        n_failed=counts["failed"],
        n_counted=counts["counted"],
        ran=ran,
        files=list(files),
    )


def _track_trial(tracker: Tracker, spec: StudySpec, trial: FrozenTrial, worker_id: str | None) -> None:
    metrics = dict(trial.user_attrs.get(METRICS_ATTR) or {})
    if trial.values is not None:
        metrics.update(zip(spec.metrics, trial.values, strict=False))
    try:
        tracker.trial_run(
            trial.number,
            # The full student config when the objective recorded one (params = the student config).
            params={**dict(trial.params), **dict(trial.user_attrs.get("student_config") or {})},
            metrics={k: v for k, v in metrics.items() if v is not None},
            tags=_trial_tags(trial, worker_id),
            status="FINISHED" if trial.state.name == "COMPLETE" else "FAILED",
        )
    except Exception as exc:  # tracking must never cost the study its results
        _log.warning("could not log trial %d to MLflow: %s", trial.number, exc)

