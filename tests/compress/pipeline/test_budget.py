"""A latency budget relative to the teacher (search.speedup), and trials over the budget timed but not distilled."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import optuna
import pytest
import torch

from compress.errors import ConfigError
from compress.nas.objective import OVER_BUDGET_ATTR, StudentSearchObjective
from compress.pipeline import load_run_recipe, prepare_labels
from compress.pipeline.search import trial_settings, with_budget
from search_spaces import build_student, load_space, preset
from tests.paths import REPO

RECIPE = REPO / "recipes" / "quickstart_cpu.yaml"
SYNTH = "synthetic: {height: 64, width: 128, max_disp: 24, num_objects: 2"
TINY = ["progress=false", "search.parent=largest", "search.space=tiny",
        f"data.train={{kind: synthetic, num_samples: 2, {SYNTH}, seed: 0}}}}",
        f"data.eval={{kind: synthetic, num_samples: 1, {SYNTH}, seed: 1000}}}}",
        "search.latency={mode: measured, backend: onnxruntime, warmup: 1, repeats: 2, threads: 1}"]


def test_speedup_sets_the_budget_from_the_teacher_once(tmp_path):
    recipe = load_run_recipe(RECIPE, [f"run_dir={tmp_path}", *TINY, "search.speedup=4"])
    torch.manual_seed(0)
    teacher = build_student(preset("tiny")).eval()
    budgeted = with_budget(recipe, tmp_path, teacher, "cpu")
    record = tmp_path / "search" / "speedup_budget.json"
    saved = json.loads(record.read_text())
    assert budgeted.search.budget_ms == pytest.approx(saved["teacher_ms"] / 4) and saved["teacher_ms"] > 0
    assert budgeted.search.speedup is None and saved["key"]["iters"] == teacher.cfg.iters
    # A resumed run keeps the recorded budget (its study was created with it) instead of timing the teacher again.
    stamp = record.stat().st_mtime_ns
    assert with_budget(recipe, tmp_path, teacher, "cpu").search.budget_ms == budgeted.search.budget_ms
    assert record.stat().st_mtime_ns == stamp
    # Without a speedup the recipe is unchanged; both at once is one clear error.
    plain = load_run_recipe(RECIPE, [f"run_dir={tmp_path}", *TINY])
    assert with_budget(plain, tmp_path, teacher, "cpu") is plain
    with pytest.raises(ConfigError, match="both set a latency budget"):
        load_run_recipe(RECIPE, ["search.speedup=4", "search.budget_ms=10"])
    with pytest.raises(ConfigError, match="search.speedup"):
        load_run_recipe(RECIPE, ["search.speedup=-2"])


def test_a_trial_over_the_budget_is_timed_and_not_distilled(tmp_path):
    recipe = load_run_recipe(RECIPE, [f"run_dir={tmp_path}", *TINY, "search.distill_steps=1", "search.batch_size=1"])
    torch.manual_seed(0)
    teacher = SimpleNamespace(model=build_student(preset("tiny")).eval(), identity={"name": "test-teacher"})
    labels_dir, eval_set = prepare_labels(recipe, tmp_path, teacher, torch.device("cpu"))
    settings = dataclasses.replace(trial_settings(recipe, tmp_path, labels_dir, eval_set, torch.device("cpu")),
                                   budget_ms=1e-6, proxy="distill")
    objective = StudentSearchObjective(load_space("tiny"), settings)
    trial = optuna.create_study(directions=["minimize", "minimize"]).ask()
    with pytest.raises(optuna.TrialPruned, match="over the budget"):
        objective(trial)
    assert trial.user_attrs["latency_ms"] > 1e-6 and "not distilled" in trial.user_attrs[OVER_BUDGET_ATTR]
    assert not (tmp_path / "trials").exists()
    # It counts toward n_trials (a space mostly over the budget still ends), unlike a worker's skipped slot.
    from compress.nas.study import _counts_toward_budget

    study = optuna.create_study(directions=["minimize", "minimize"])
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED,
                                              user_attrs={OVER_BUDGET_ATTR: "over"}))
    assert _counts_toward_budget(study.trials[0])
