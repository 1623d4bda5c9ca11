"""Create, join and run a multi-objective Optuna study against an objective that returns named metrics.

One module over the ~500-line guide: creating, joining and running a study, constraints, failure records and
the front on disk all share the study's user attributes and storage conventions.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import os
import socket
import sys
import time
import uuid
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
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
    SPEC_ATTR,
    ParetoFront,
    front_from_study,
    normalize_direction,
    plot_front,
    write_front,
)
from compress.nas.storage import describe_storage, heartbeat_enabled, stale_trial_retry

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial, Trial

    from compress.tracking import Tracker

_log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "nsga2", "random")
UID_ATTR = "ffsc.uid"
PARENT_RUN_ATTR = "mlflow_parent_run_id"
WORKER_ATTR = "worker"
SKIPPED_ATTR = "skipped"
ABORTED_ATTR = "aborted"
CONSTRAINT_NAME = "latency_budget"

# How long a joining worker waits for the creating worker to record the spec on a new study.
_SPEC_WAIT_S = 20.0
# A RUNNING trial whose owner is unknown (killed between ask() and recording its owner) is given
# this long before it is failed, on storages without heartbeats.
_ORPHAN_AGE_S = 120.0
_MAX_REASON_CHARS = 2000

Objective = Callable[["Trial"], Mapping[str, float]]
TrialEndHook = Callable[["optuna.Study", "FrozenTrial", ParetoFront], None]


@dataclass
class StudySpec:
    """What a NAS study optimises and how; recorded on the study so every worker and resume agrees."""

    name: str
    metrics: tuple[str, ...] = ("epe", "latency_ms")
    directions: tuple[str, ...] = ("minimize", "minimize")
    sampler: str = "tpe"
    seed: int | None = 0
    budget_ms: float | None = None
    budget_metric: str = "latency_ms"
    n_trials: int = 50
    timeout: float | None = None

    def __post_init__(self) -> None:
        self.metrics = tuple(str(m) for m in self.metrics)
        self.directions = tuple(normalize_direction(d) for d in self.directions)
        self.sampler = str(self.sampler).lower()
        if not self.name or not str(self.name).strip():
            raise ConfigError("StudySpec.name is empty; give the study a name (it keys resume and workers)")
        if not self.metrics or len(self.metrics) != len(self.directions):
            raise ConfigError(
                f"StudySpec has metrics {list(self.metrics)} and directions {list(self.directions)}; "
                "expected one direction per objective metric (at least one)"
            )
        if len(set(self.metrics)) != len(self.metrics):
            raise ConfigError(f"StudySpec.metrics {list(self.metrics)} repeats a name; each objective once")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"StudySpec.sampler is {self.sampler!r}; expected one of {SAMPLERS}")
        if isinstance(self.n_trials, bool) or int(self.n_trials) != self.n_trials or self.n_trials < 1:
            raise ConfigError(f"StudySpec.n_trials is {self.n_trials!r}; expected a positive integer")
        self.n_trials = int(self.n_trials)
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigError(f"StudySpec.timeout is {self.timeout!r}; expected seconds > 0 or None")
        if self.budget_ms is not None:
            budget = float(self.budget_ms)
            if not math.isfinite(budget) or budget <= 0:
                raise ConfigError(f"StudySpec.budget_ms is {self.budget_ms!r}; expected milliseconds > 0")
            self.budget_ms = budget
            if self.budget_metric not in self.metrics:
                raise ConfigError(
                    f"the latency budget applies to {self.budget_metric!r}, which is not one of the "
                    f"objectives {list(self.metrics)}; set budget_metric to the latency objective"
                )
            if self.directions[self.metrics.index(self.budget_metric)] != "minimize":
                raise ConfigError(f"the budget metric {self.budget_metric!r} must be minimised to have a budget")

    def to_dict(self) -> dict[str, Any]:
        """Return the spec as JSON-ready values."""
        data = dataclasses.asdict(self)
        data["metrics"] = list(self.metrics)
        data["directions"] = list(self.directions)
        return data


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


def _has_set_constraint() -> bool:
    import optuna

    return hasattr(optuna.trial.Trial, "set_constraint")


def _legacy_constraints(trial: FrozenTrial) -> Sequence[float]:
    # Optuna < 5 only: samplers read constraints through constraints_func after each trial.
    return tuple(trial.user_attrs.get(CONSTRAINT_ATTR) or (0.0,))


def derive_seed(seed: int | None, worker_id: str | None, n_existing: int) -> int | None:
    """Return the sampler seed for one worker joining after `n_existing` trials (the plain seed for a fresh run).

    Workers and resumed runs must not replay the random sequence of an earlier process, or they would
    re-propose the same architectures.
    """
    if seed is None:
        return None
    if worker_id is None and n_existing == 0:
        return int(seed)
    salt = zlib.crc32(f"{worker_id}|{n_existing}".encode())
    return (int(seed) * 1_000_003 + salt) % (2**31 - 1)


def make_sampler(spec: StudySpec, seed: int | None) -> optuna.samplers.BaseSampler:
    """Return the sampler the spec names (seeded; constraints come from the trials themselves)."""
    import optuna

    legacy = (
        {} if _has_set_constraint() or spec.budget_ms is None else {"constraints_func": _legacy_constraints}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if spec.sampler == "tpe":
            # constant_liar keeps parallel workers from proposing the same point while others still run.
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True, **legacy)
        if spec.sampler == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, **legacy)
        return optuna.samplers.RandomSampler(seed=seed)


def _wait_for_spec(study: optuna.Study) -> dict[str, Any] | None:
    deadline = time.monotonic() + _SPEC_WAIT_S
    while True:
        recorded = study.user_attrs.get(SPEC_ATTR)
        # The creator records the spec before its first trial: with trials and no spec, the study
        # was made by something other than ffsc and no spec is coming.
        if recorded is not None or time.monotonic() > deadline or study.get_trials(deepcopy=False):
            return recorded
        time.sleep(0.2)


def _check_compatible(
    spec: StudySpec, study: optuna.Study, storage: BaseStorage, recorded: Mapping[str, Any] | None
) -> None:
    where = f"study {spec.name!r} in {describe_storage(storage)}"
    have_dirs = [normalize_direction(d) for d in study.directions]
    have_metrics = list(recorded["metrics"]) if recorded else list(study.metric_names or [])
    problems = []
    if have_dirs != list(spec.directions):
        problems.append(f"directions {have_dirs} (asked: {list(spec.directions)})")
    if have_metrics and have_metrics != list(spec.metrics):
        problems.append(f"metrics {have_metrics} (asked: {list(spec.metrics)})")
    if recorded:
        if "budget_ms" not in recorded:  # a study recorded before the budget had one name everywhere
            recorded = {**recorded, "budget_ms": recorded.get("latency_budget_ms")}
        budget_keys = ["budget_ms"] + (["budget_metric"] if spec.budget_ms is not None else [])
        for key in budget_keys:
            if recorded.get(key) != getattr(spec, key):
                problems.append(f"{key} {recorded.get(key)!r} (asked: {getattr(spec, key)!r})")
        for key in ("sampler", "seed"):
            if recorded.get(key) != getattr(spec, key):
                _log.warning(
                    "%s was created with %s=%r; this worker uses %r", where, key, recorded.get(key), getattr(spec, key)
                )
    if problems:
        raise ConfigError(
            f"{where} already exists with "
            + "; ".join(problems)
            + ". A study's objectives and budget cannot change: use a new study name or the original spec."
        )


def create_study(spec: StudySpec, storage: BaseStorage, *, worker_id: str | None = None) -> optuna.Study:
    """Create the study once (later callers join it) and refuse to join one with other objectives or budget.

    No pruner is set (NopPruner): Optuna cannot prune multi-objective trials.
    """
    import optuna

    try:
        study = optuna.create_study(
            study_name=spec.name,
            storage=storage,
            directions=list(spec.directions),
            sampler=optuna.samplers.RandomSampler(),
            pruner=optuna.pruners.NopPruner(),
            load_if_exists=False,
        )
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(
            study_name=spec.name,
            storage=storage,
            sampler=optuna.samplers.RandomSampler(),
            pruner=optuna.pruners.NopPruner(),
        )
        created = False
    if created:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(spec.metrics))
        study.set_user_attr(UID_ATTR, uuid.uuid4().hex)
        study.set_user_attr(SPEC_ATTR, spec.to_dict())
    else:
        _check_compatible(spec, study, storage, _wait_for_spec(study))
    n_existing = len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(spec, derive_seed(spec.seed, worker_id, n_existing))
    return study


@dataclass(frozen=True)
class WorkerIdentity:
    """Who runs a trial, precise enough to tell later whether that process still lives."""

    worker_id: str | None
    host: str
    pid: int
    start: str | None

    @classmethod
    def current(cls, worker_id: str | None) -> WorkerIdentity:
        """Return the identity of this process."""
        return cls(worker_id, socket.gethostname(), os.getpid(), _process_start(os.getpid()))

    def attr(self, trial_number: int) -> dict[str, Any]:
        """Return the user attr value recording this worker as the owner of one trial."""
        return {"id": self.worker_id, "host": self.host, "pid": self.pid, "start": self.start, "trial": trial_number}


def _proc_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; the fields after the last ')' are fixed.
    return text.rsplit(")", 1)[-1].split()


def _process_start(pid: int) -> str | None:
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def process_alive(pid: int, start: str | None = None) -> bool:
    """Return whether process `pid` (started at `start` ticks, when known) still runs on this machine."""
    if os.name == "nt":
        return True  # os.kill(pid, 0) would signal the process on Windows; assume alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat(pid)
    if fields is None:
        return True
    if fields[0] in ("Z", "X"):
        return False
    # A different start time means the pid was reused by another process.
    return start is None or len(fields) <= 19 or fields[19] == start


def _counts_toward_budget(trial: FrozenTrial) -> bool:
    state = trial.state.name
    if state == "COMPLETE":
        return True
    if state == "FAIL":
        # Failures of the objective count; a worker that died or was interrupted does not.
        return FAIL_REASON_ATTR in trial.user_attrs
    if state == "PRUNED":
        return SKIPPED_ATTR not in trial.user_attrs
    return False


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """Return counted (toward n_trials), complete, failed, running and waiting trial counts."""
    counts = {"counted": 0, "complete": 0, "failed": 0, "running": 0, "waiting": 0}
    for t in study.get_trials(deepcopy=False):
        counts["counted"] += _counts_toward_budget(t)
        state = t.state.name
        counts["complete"] += state == "COMPLETE"
        counts["failed"] += state == "FAIL"
        counts["running"] += state == "RUNNING"
        counts["waiting"] += state == "WAITING"
    return counts


def reap_dead_trials(study: optuna.Study, storage: BaseStorage, max_retry: int | None = 2) -> list[int]:
    """Fail RUNNING trials whose worker process is gone and re-enqueue their parameters; return their numbers.

    Owners on this machine are checked directly (pid and start time), so a killed single-process run
    resumes at once; owners elsewhere are left to the storage heartbeat.
    """
    import optuna
    from optuna.trial import TrialState

    host = socket.gethostname()
    hb = heartbeat_enabled(storage)
    now = datetime.now()
    reaped = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(WORKER_ATTR)
        if isinstance(owner, Mapping) and owner.get("trial") == t.number:
            if owner.get("host") != host or process_alive(int(owner["pid"]), owner.get("start")):
                continue
            why = f"worker process {owner['pid']} on {host} is gone"
        else:
            # No owner recorded for this trial (or only the one copied from the trial it retries).
            started = t.datetime_start
            if hb or started is None or (now - started).total_seconds() < _ORPHAN_AGE_S:
                continue
            why = f"no worker recorded itself for {_ORPHAN_AGE_S:.0f} s"
        study_id = storage.get_study_id_from_name(study.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        try:
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker finished or reaped it first
        _log.warning("trial %d was left RUNNING (%s): marked FAIL and re-enqueued", t.number, why)
        stale_trial_retry(max_retry)(study, storage.get_trial(trial_id))
        reaped.append(t.number)
    return reaped


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

    from compress.terminal import progress_bar

    counts = trial_counts(study)
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
