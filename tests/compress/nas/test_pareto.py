"""Pareto front computation, the feasible front of a budgeted study, atomic front files and the plot."""

from __future__ import annotations

import csv
import json

import numpy as np
import optuna
import pytest
from PIL import Image

from compress.errors import ConfigError
from compress.nas import StudySpec, front_from_study, make_storage, pareto_front, plot_front, run_study, write_front

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _dominates(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all(a <= b) and np.any(a < b))


def test_front_of_hand_made_points_keeps_duplicates_and_drops_dominated():
    points = [[1, 5], [2, 3], [3, 4], [4, 1], [2, 3], [4, 2], [5, 5]]
    assert pareto_front(points, ["minimize", "minimize"]).tolist() == [0, 1, 3, 4]


def test_tie_in_one_objective_is_broken_by_the_other():
    assert pareto_front([[1, 3], [1, 2], [0, 9]], ["minimize", "minimize"]).tolist() == [1, 2]


def test_maximize_direction_flips_dominance():
    points = [[1.0, 10.0], [2.0, 20.0], [3.0, 15.0]]  # (latency, accuracy)
    assert pareto_front(points, ["minimize", "maximize"]).tolist() == [0, 1]
    assert pareto_front(points, ["maximize", "maximize"]).tolist() == [1, 2]


def test_nan_rows_never_enter_the_front_and_empty_input_is_empty():
    assert pareto_front([[np.nan, 0.0], [1.0, 1.0]], ["minimize", "minimize"]).tolist() == [1]
    assert pareto_front(np.zeros((0, 2)), ["minimize", "minimize"]).tolist() == []


def test_wrong_number_of_directions_is_a_config_error():
    with pytest.raises(ConfigError, match="directions"):
        pareto_front([[1, 2, 3]], ["minimize", "minimize"])
    with pytest.raises(ConfigError, match="direction"):
        pareto_front([[1, 2]], ["minimize", "sideways"])


def test_random_integer_points_front_is_exactly_the_non_dominated_set():
    rng = np.random.default_rng(3)
    pts = rng.integers(0, 6, size=(200, 3)).astype(float)  # small range: many ties and duplicates
    front = set(pareto_front(pts, ["minimize"] * 3).tolist())
    for i in range(len(pts)):
        dominated = any(_dominates(pts[j], pts[i]) for j in range(len(pts)))
        assert (i in front) == (not dominated)


def _analytic(trial: optuna.Trial) -> dict[str, float]:
    x = trial.suggest_float("x", 0.0, 3.0)
    y = trial.suggest_float("y", 0.0, 1.0)
    return {"epe": (x - 1.0) ** 2 + y, "latency_ms": 10.0 / (1.0 + x) + y}


@pytest.fixture(scope="module")
def budget_study(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("budget")
    spec = StudySpec("budgeted", sampler="random", seed=5, n_trials=30, budget_ms=4.0)
    result = run_study(spec, make_storage(None, run_dir), _analytic, run_dir=run_dir, plot_every=0)
    return result, run_dir


def test_budget_excludes_over_budget_trials_from_the_reported_front(budget_study):
    result, _ = budget_study
    study = result.study
    latencies = {t.number: t.user_attrs["metrics"]["latency_ms"] for t in study.trials if t.values}
    over = {n for n, lat in latencies.items() if lat > 4.0}
    assert over, "the random sample should contain over-budget trials (x < 1.5 or large y)"
    front = front_from_study(study)
    assert front.points
    assert all(p.feasible and p.metrics["latency_ms"] <= 4.0 for p in front.points)
    assert not over & {p.number for p in front.points}
    assert front.n_infeasible == len(over)
    # The budgeted front equals the plain front of the feasible trials.
    feasible = [t for t in study.trials if t.number not in over]
    expected = {feasible[i].number for i in pareto_front([t.values for t in feasible], ["minimize", "minimize"])}
    assert {p.number for p in front.points} == expected
    # Without the feasibility filter the most accurate trial (slow: x near 1) is on the front again.
    unfiltered = front_from_study(study, feasible_only=False)
    most_accurate = min(latencies, key=lambda n: study.trials[n].values[0])
    assert most_accurate in over and most_accurate in {p.number for p in unfiltered.points}


def test_front_files_are_complete_and_written_atomically(budget_study, tmp_path):
    result, run_dir = budget_study
    front = result.front
    with open(run_dir / "pareto_front.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["trial"]) for r in rows] == [p.number for p in front.points]
    assert {"epe", "latency_ms", "param.x", "param.y", "feasible"} <= set(rows[0])
    data = json.loads((run_dir / "pareto_front.json").read_text())
    assert data["study"] == "budgeted" and data["budget"] == 4.0 and data["budget_metric"] == "latency_ms"
    assert data["objectives"] == ["epe", "latency_ms"]
    assert [p["trial"] for p in data["points"]] == [p.number for p in front.points]
    assert all(p["feasible"] for p in data["points"])
    # Re-writing over existing files leaves only the two final files (no temporaries).
    out = tmp_path / "front"
    write_front(front, out)
    write_front(front, out)
    assert sorted(f.name for f in out.iterdir()) == ["pareto_front.csv", "pareto_front.json"]


def test_plot_front_writes_a_png_from_a_study_or_trials(budget_study, tmp_path):
    result, _ = budget_study
    png = plot_front(result.study, tmp_path / "front.png")
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 200
    trials = result.study.get_trials()
    png2 = plot_front(trials, tmp_path / "front2.png", x="latency_ms", y="epe", budget=4.0)
    assert png2.stat().st_size > 1000
    with pytest.raises(ConfigError, match="no metric"):
        plot_front(result.study, tmp_path / "bad.png", x="gflops")
    assert not (tmp_path / "bad.png").exists()
