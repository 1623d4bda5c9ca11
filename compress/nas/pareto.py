"""Pareto fronts of NAS trials: the dominance computation, atomic CSV/JSON output and a plot."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compress.atomic import atomic_write_bytes
from compress.errors import ConfigError

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

# Names of the trial/study attributes the NAS machinery writes; readers here and in study.py share them.
SPEC_ATTR = "ffsc.spec"
METRICS_ATTR = "metrics"
CONSTRAINT_ATTR = "constraint"
FAIL_REASON_ATTR = "fail_reason"

FRONT_CSV = "pareto_front.csv"
FRONT_JSON = "pareto_front.json"
FRONT_PNG = "pareto_front.png"

_VALID_DIRECTIONS = ("minimize", "maximize")


def normalize_direction(direction: Any) -> str:
    """Return "minimize" or "maximize" for a string or an optuna StudyDirection."""
    name = getattr(direction, "name", direction)
    text = str(name).strip().lower()
    if text not in _VALID_DIRECTIONS:
        raise ConfigError(f"unknown optimisation direction {direction!r}; expected one of {_VALID_DIRECTIONS}")
    return text


def pareto_front(points: Any, directions: Sequence[Any]) -> np.ndarray:
    """Return the sorted row indices of the non-dominated points (all copies of a tied point are kept)."""
    arr = np.asarray(points, dtype=float)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2 or arr.shape[1] != len(directions):
        raise ConfigError(
            f"points have shape {arr.shape} but {len(directions)} directions were given; "
            "expected an (n_points, n_objectives) array with one direction per objective"
        )
    signs = np.array([1.0 if normalize_direction(d) == "minimize" else -1.0 for d in directions])
    # Everything becomes minimisation; a NaN objective cannot be compared, so such rows never enter the front.
    costs = arr * signs
    valid = ~np.isnan(costs).any(axis=1)
    candidates = np.flatnonzero(valid)
    sub = costs[valid]
    keep = np.ones(len(sub), dtype=bool)
    for i in range(len(sub)):
        no_worse = np.all(sub <= sub[i], axis=1)
        better = np.any(sub < sub[i], axis=1)
        if np.any(no_worse & better):
            keep[i] = False
    return candidates[keep]


def trial_constraints(trial: FrozenTrial) -> list[float]:
    """Return a trial's constraint values (<= 0 is feasible) from Optuna's record or our own user attr."""
    constraints = getattr(trial, "constraints", None)  # Optuna >= 5 exposes a dict
    if isinstance(constraints, Mapping) and constraints:
        return [float(v) for v in constraints.values()]
    legacy = trial.system_attrs.get("constraints")  # Optuna < 5 with constraints_func
    if legacy:
        return [float(v) for v in legacy]
    own = trial.user_attrs.get(CONSTRAINT_ATTR)
    if own:
        return [float(v) for v in own]
    return []


def constraint_violation(trial: FrozenTrial) -> float:
    """Return the total amount by which a trial violates its constraints (0.0 when feasible)."""
    return float(sum(v for v in trial_constraints(trial) if v > 0))


@dataclass(frozen=True)
class TrialPoint:
    """One finished trial as the front reports it."""

    number: int
    params: dict[str, Any]
    metrics: dict[str, float]
    values: tuple[float, ...]
    feasible: bool
    violation: float


@dataclass
class ParetoFront:
    """Non-dominated trials of a study with what is needed to report them."""

    study_name: str
    objectives: tuple[str, ...]
    directions: tuple[str, ...]
    points: list[TrialPoint] = field(default_factory=list)
    n_complete: int = 0
    n_failed: int = 0
    n_infeasible: int = 0
    budget: float | None = None
    budget_metric: str | None = None
    feasible_only: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (non-finite numbers become null)."""
        return _json_safe(
            {
                "study": self.study_name,
                "objectives": list(self.objectives),
                "directions": list(self.directions),
                "budget": self.budget,
                "budget_metric": self.budget_metric,
                "feasible_only": self.feasible_only,
                "n_complete": self.n_complete,
                "n_failed": self.n_failed,
                "n_infeasible": self.n_infeasible,
                "points": [
                    {
                        "trial": p.number,
                        "feasible": p.feasible,
                        "violation": p.violation,
                        "values": list(p.values),
                        "metrics": p.metrics,
                        "params": p.params,
                    }
                    for p in self.points
                ],
            }
        )


def study_spec_attrs(study: optuna.Study) -> dict[str, Any]:
    """Return the spec ffsc recorded on a study (empty for studies created elsewhere)."""
    spec = study.user_attrs.get(SPEC_ATTR)
    return dict(spec) if isinstance(spec, Mapping) else {}


def objective_names(study: optuna.Study) -> tuple[str, ...]:
    """Return the study's objective names: recorded spec, then Optuna metric names, then obj0.. ."""
    spec = study_spec_attrs(study)
    if spec.get("metrics"):
        return tuple(spec["metrics"])
    names = study.metric_names
    if names:
        return tuple(names)
    return tuple(f"obj{i}" for i in range(len(study.directions)))


def trial_metrics(trial: FrozenTrial, objectives: Sequence[str]) -> dict[str, float]:
    """Return every metric of a trial: the stored metrics dict, with objective values filled in by name."""
    metrics: dict[str, float] = {}
    stored = trial.user_attrs.get(METRICS_ATTR)
    if isinstance(stored, Mapping):
        for key, value in stored.items():
            metrics[str(key)] = float("nan") if value is None else float(value)
    if trial.values is not None:
        for name, value in zip(objectives, trial.values, strict=False):
            metrics.setdefault(name, float(value))
    return metrics


def _trial_state_name(trial: FrozenTrial) -> str:
    return trial.state.name


def front_from_study(study: optuna.Study, feasible_only: bool = True) -> ParetoFront:
    """Return the Pareto front of a study's COMPLETE trials, dropping constraint violators by default."""
    trials = study.get_trials(deepcopy=False)
    spec = study_spec_attrs(study)
    objectives = objective_names(study)
    directions = tuple(normalize_direction(d) for d in study.directions)
    complete = [t for t in trials if _trial_state_name(t) == "COMPLETE" and t.values is not None]
    feasible_flags = [constraint_violation(t) == 0.0 for t in complete]
    pool = [t for t, ok in zip(complete, feasible_flags, strict=True) if ok or not feasible_only]
    idx = pareto_front([list(t.values) for t in pool], directions) if pool else np.zeros(0, dtype=np.int64)
    points = []
    for i in idx:
        t = pool[int(i)]
        violation = constraint_violation(t)
        points.append(
            TrialPoint(
                number=t.number,
                params=dict(t.params),
                metrics=trial_metrics(t, objectives),
                values=tuple(float(v) for v in t.values),
                feasible=violation == 0.0,
                violation=violation,
            )
        )
    points.sort(key=lambda p: (p.values, p.number))
    return ParetoFront(
        study_name=study.study_name,
        objectives=objectives,
        directions=directions,
        points=points,
        n_complete=len(complete),
        n_failed=sum(1 for t in trials if _trial_state_name(t) == "FAIL"),
        n_infeasible=sum(1 for ok in feasible_flags if not ok),
        budget=spec.get("latency_budget_ms"),
        budget_metric=spec.get("budget_metric") if spec.get("latency_budget_ms") is not None else None,
        feasible_only=feasible_only,
    )


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return _json_safe(obj.item())
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def _cell(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(_json_safe(value), sort_keys=True)
    return value


def front_csv_text(front: ParetoFront) -> str:
    """Return the CSV text of a front: trial, feasibility, objectives, other metrics, then params."""
    metric_names = list(front.objectives)
    extra = sorted({k for p in front.points for k in p.metrics} - set(metric_names))
    param_names = sorted({k for p in front.points for k in p.params})
    header = ["trial", "feasible", "violation", *metric_names, *extra, *(f"param.{k}" for k in param_names)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for p in front.points:
        row = [p.number, p.feasible, p.violation]
        row += [_cell(p.metrics.get(k, "")) for k in metric_names + extra]
        row += [_cell(p.params.get(k, "")) for k in param_names]
        writer.writerow(row)
    return buffer.getvalue()


def write_front(front: ParetoFront, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write `pareto_front.csv` and `pareto_front.json` into `out_dir` atomically; return both paths."""
    out = Path(out_dir)
    csv_path = atomic_write_bytes(out / FRONT_CSV, front_csv_text(front).encode("utf-8"))
    text = json.dumps(front.to_dict(), indent=2, sort_keys=False, allow_nan=False) + "\n"
    json_path = atomic_write_bytes(out / FRONT_JSON, text.encode("utf-8"))
    return csv_path, json_path


_UNITS = {"epe": "EPE (px)", "latency_ms": "latency (ms)", "params_m": "parameters (M)", "gflops": "GFLOPs"}


def axis_label(metric: str) -> str:
    """Return an axis label with units for a metric name (suffixes _ms, _px, _pct, _mb are understood)."""
    if metric in _UNITS:
        return _UNITS[metric]
    for suffix, unit in (("_ms", "ms"), ("_px", "px"), ("_pct", "%"), ("_mb", "MB"), ("_s", "s")):
        if metric.endswith(suffix):
            return f"{metric[: -len(suffix)].replace('_', ' ')} ({unit})"
    return metric.replace("_", " ")


def plot_front(
    source: optuna.Study | Iterable[FrozenTrial],
    out_png: str | os.PathLike[str],
    x: str = "latency_ms",
    y: str = "epe",
    budget: float | None = None,
    *,
    directions: tuple[str, str] | None = None,
    title: str | None = None,
) -> Path:
    """Plot trials (grey), over-budget ones (red x), the front as a step line and the budget line to a PNG."""
    from matplotlib.figure import Figure  # no pyplot: never touches the process-wide backend

    study_name = "trials"
    spec: dict[str, Any] = {}
    if hasattr(source, "get_trials"):
        study = source
        trials = study.get_trials(deepcopy=False)
        study_name = study.study_name
        spec = study_spec_attrs(study)
        objectives = objective_names(study)
        study_dirs = dict(zip(objectives, (normalize_direction(d) for d in study.directions), strict=False))
    else:
        trials = list(source)
        objectives = ()
        study_dirs = {}
    if directions is None:
        directions = (study_dirs.get(x, "minimize"), study_dirs.get(y, "minimize"))
    if budget is None and spec.get("latency_budget_ms") is not None and spec.get("budget_metric") == x:
        budget = float(spec["latency_budget_ms"])

    xs, ys, feasible, numbers = [], [], [], []
    for t in trials:
        if _trial_state_name(t) != "COMPLETE":
            continue
        metrics = trial_metrics(t, objectives)
        if x not in metrics or y not in metrics:
            raise ConfigError(
                f"trial {t.number} has no metric {x!r} or {y!r} to plot (it has {sorted(metrics)}); "
                "pass x= and y= naming recorded metrics"
            )
        xs.append(metrics[x])
        ys.append(metrics[y])
        feasible.append(constraint_violation(t) == 0.0)
        numbers.append(t.number)
    n_failed = sum(1 for t in trials if _trial_state_name(t) == "FAIL")
    xs_a, ys_a, feas_a = np.array(xs, dtype=float), np.array(ys, dtype=float), np.array(feasible, dtype=bool)
    feas_idx = np.flatnonzero(feas_a)
    front_idx = np.zeros(0, dtype=np.int64)
    if len(feas_idx):
        front_idx = feas_idx[pareto_front(np.stack([xs_a[feas_idx], ys_a[feas_idx]], axis=1), directions)]

    fig = Figure(figsize=(7.0, 5.0), layout="constrained")
    ax = fig.subplots()
    on_front = np.zeros(len(xs_a), dtype=bool)
    on_front[front_idx] = True
    rest = feas_a & ~on_front
    ax.scatter(xs_a[rest], ys_a[rest], s=18, color="0.6", alpha=0.8, label=f"feasible trials ({int(rest.sum())})")
    if (~feas_a).any():
        ax.scatter(
            xs_a[~feas_a],
            ys_a[~feas_a],
            s=22,
            marker="x",
            color="tab:red",
            alpha=0.7,
            label=f"over budget ({int((~feas_a).sum())})",
        )
    if len(front_idx):
        order = front_idx[np.argsort(xs_a[front_idx], kind="stable")]
        where = "post" if directions[0] == "minimize" else "pre"
        ax.step(xs_a[order], ys_a[order], where=where, color="tab:blue", linewidth=1.5)
        ax.scatter(
            xs_a[order],
            ys_a[order],
            s=40,
            color="tab:blue",
            edgecolor="black",
            zorder=3,
            label=f"Pareto front ({len(order)})",
        )
        for i in order:
            ax.annotate(str(numbers[i]), (xs_a[i], ys_a[i]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if budget is not None:
        unit = " ms" if x.endswith("_ms") else ""
        ax.axvline(budget, color="tab:red", linestyle="--", linewidth=1.2, label=f"budget {budget:g}{unit}")
    ax.set_xlabel(axis_label(x))
    ax.set_ylabel(axis_label(y))
    ax.grid(True, alpha=0.3)
    if len(xs_a) or budget is not None:
        ax.legend(loc="best", fontsize=8)
    if title is None:
        title = (
            f"{study_name}: {len(xs_a)} complete, {n_failed} failed, "
            f"{int((~feas_a).sum())} over budget, {len(front_idx)} on front"
        )
    ax.set_title(title, fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return atomic_write_bytes(Path(out_png), buffer.getvalue())
