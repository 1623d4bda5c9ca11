"""Create or join a multi-objective Optuna study: its spec (objectives, budget, sampler) recorded on the study, so
every worker and resume agrees on it."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from compress.errors import ConfigError
from compress.nas.pareto import CONSTRAINT_ATTR, SPEC_ATTR, normalize_direction
from compress.nas.storage import describe_storage

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial

# optuna itself is imported where a study is made: importing compress.nas stays cheap (see its docstring).

_log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "nsga2", "random")
UID_ATTR = "ffsc.uid"

# How long a joining worker waits for the creating worker to record the spec on a new study.
_SPEC_WAIT_S = 20.0


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
