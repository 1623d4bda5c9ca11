"""The run's search stage: the Optuna study over the recipe's space, its latency budget, and the front it leaves."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import torch

from compress.errors import ConfigError
from compress.latency import LatencyCache, measure
from compress.latency_predictor import LatencyTable, check_predictor, open_table
from compress.nas.objective import StudentSearchObjective, TrialSettings
from compress.nas.pareto import ParetoFront
from compress.nas.spec import StudySpec
from compress.nas.storage import make_storage
from compress.nas.study import StudyResult, run_study
from search_spaces import SearchSpace

from .context import RunContext, labels_config, say, search_parent, search_space, teacher_iters
from .recipe import RunRecipe
from .records import ChosenStudent, FrontRow, StageRecord


def trial_settings(recipe: RunRecipe, run_dir: Path, labels_dir: Path, eval_set, device: torch.device,
                   parent: Path | None = None) -> TrialSettings:
    """What every trial of the recipe's search distils on, with and how it is timed."""
    s = recipe.search
    table = open_table(s.latency) if s.latency.mode == "predicted" else None
    return TrialSettings(
        run_dir=run_dir, train_data=recipe.data.train, labels_dir=labels_dir, labels=labels_config(recipe),
        eval_set=eval_set, height=recipe.height, width=recipe.width, distill_steps=s.distill_steps,
        batch_size=s.batch_size, loss=recipe.loss, optim=recipe.optim, error_metric=s.error_metric,
        latency=s.latency, device=str(device), seed=recipe.seed, latency_table=table, proxy=s.proxy,
        parent_steps=s.parent_steps, parent=parent, crop_size=recipe.data.crop_size, progress=recipe.progress,
    )


def study_spec(recipe: RunRecipe) -> StudySpec:
    """The Optuna study a recipe searches (same for every worker)."""
    s = recipe.search
    return StudySpec(name=f"{recipe.name}-search", metrics=("epe", "latency_ms"), directions=("minimize", "minimize"),
                     sampler=s.sampler, seed=s.seed, budget_ms=s.budget_ms, n_trials=s.n_trials,
                     timeout=s.timeout)


def check_predictor_once(recipe: RunRecipe, run_dir: Path, table: LatencyTable, space: SearchSpace
                         ) -> tuple[dict[str, str], float]:
    """Predicted against measured latency of a few sampled students, once per run (kept in
    search/predictor_check.json); says so when the predictor is off by more than the threshold here.
    Returns MLflow tags for the study's run and the calibration scale (median measured / predicted) that the
    search multiplies its predictions by."""
    lat = recipe.search.latency
    # Another machine (a worker), backend, precision, clock or size checks again.
    record = StageRecord(run_dir / "search" / "predictor_check.json",
                         {"backend": lat.backend, "hardware": table.hardware, "precision": lat.precision,
                          "clock": lat.clock, "size": [lat.height, lat.width], "students": lat.check_students,
                          "seed": recipe.seed})
    saved = record.load()
    if saved is None:
        say(recipe, f"latency predictor: checking it against {lat.check_students} measured students")
        evaluation = check_predictor(table, space, lat, lat.height, lat.width, seed=recipe.seed,
                                     progress=recipe.progress)
        if evaluation is None:
            return {}, 1.0
        saved = record.save(median_abs_error=evaluation.median_abs_relative_error, students=len(evaluation.rows),
                            scale=evaluation.scale, threshold=lat.max_predictor_error,
                            evaluation=evaluation.to_dict())
    error = saved["median_abs_error"]
    say(recipe, f"latency predictor: median |error| {error:.1%} over {saved['students']} students "
                f"({lat.backend} on {table.hardware}, {lat.height}x{lat.width}); predictions are scaled by "
                f"{saved['scale']:.3f}, the median measured / predicted of those students")
    if error > lat.max_predictor_error:
        say(recipe, f"warning: the latency predictor is off by a median {error:.0%} here (threshold "
                    f"{lat.max_predictor_error:.0%}); the front may misplace students: consider "
                    "search.latency.mode=measured")
    tags = {"ffsc.predictor.median_abs_error": f"{error:.4f}", "ffsc.predictor.students": str(saved["students"]),
            "ffsc.predictor.scale": f"{saved['scale']:.4f}"}
    return tags, float(saved["scale"])


def run_search(ctx: RunContext, storage_url: str | None = None, worker_id: str | None = None) -> StudyResult:
    """The NAS stage: a multi-objective study whose trials distil sampled students briefly (``ctx`` opened)."""
    recipe, run_dir, teacher = ctx.recipe, ctx.run_dir, ctx.teacher
    parent = search_parent(recipe, teacher.path if teacher.is_student else None)
    space = search_space(recipe, parent)
    if parent is not None:
        say(recipe, f"search: sub-networks of {parent} (space {space.name}, {space.size()} members); every trial "
                    "starts from its weights")
    recipe = with_budget(recipe, run_dir, teacher.model, ctx.device)
    settings = trial_settings(recipe, run_dir, ctx.labels_dir, ctx.eval_set, ctx.device, parent=parent)
    settings.budget_ms = recipe.search.budget_ms
    objective = StudentSearchObjective(space, settings)
    storage = make_storage(storage_url or recipe.search.storage, run_dir)
    lat = recipe.search.latency
    tags = {"ffsc.teacher": teacher.description[:250], "ffsc.space": space.name,
            "ffsc.latency.backend": lat.backend, "ffsc.latency.mode": lat.mode,
            "ffsc.latency.reason": ctx.choice.reason[:250]}
    if settings.latency_table is not None:
        check_tags, settings.latency_scale = check_predictor_once(recipe, run_dir, settings.latency_table, space)
        tags.update(check_tags)
    return run_study(study_spec(recipe), storage, objective, tracker=ctx.tracker, worker_id=worker_id,
                     run_dir=run_dir / "search", run_tags=tags)


def with_budget(recipe: RunRecipe, run_dir: Path, teacher_model: torch.nn.Module, device) -> RunRecipe:
    """The recipe with ``search.speedup`` turned into ``search.budget_ms`` (unchanged without a speedup)."""
    if recipe.search.speedup is None:
        return recipe
    budget = speedup_budget(recipe, run_dir, teacher_model, device)
    return dataclasses.replace(recipe, search=dataclasses.replace(recipe.search, budget_ms=budget, speedup=None))


def speedup_budget(recipe: RunRecipe, run_dir: Path, teacher_model: torch.nn.Module, device) -> float:
    """The latency budget ``search.speedup`` asks for: the teacher's latency (timed once, kept in
    search/speedup_budget.json so a resumed study keeps its budget) over the speedup."""
    lat, s = recipe.search.latency, recipe.search
    iters = teacher_iters(recipe, teacher_model)
    record = StageRecord(run_dir / "search" / "speedup_budget.json",
                         {"backend": lat.backend, "size": [lat.height, lat.width], "precision": lat.precision,
                          "iters": iters, "threads": lat.threads, "clock": lat.clock, "speedup": s.speedup})
    saved = record.load()
    if saved is None:
        say(recipe, f"search: timing the teacher for the {s.speedup:g}x speedup budget ({lat.backend}, "
                    f"{lat.precision}, {lat.height}x{lat.width}, {iters} iterations)")
        stats = measure(teacher_model, lat.backend, lat.height, lat.width, iters=iters, device=lat.device or device,
                        cache=LatencyCache(run_dir / "latency_cache.sqlite"), **lat.timing())
        saved = record.save(teacher_ms=stats.median_ms, budget_ms=stats.median_ms / s.speedup)
    say(recipe, f"search: budget {saved['budget_ms']:.1f} ms, the teacher's {saved['teacher_ms']:.1f} ms over "
                f"{s.speedup:g}; trials over it are timed, not distilled")
    return float(saved["budget_ms"])


def choose_student(front: ParetoFront, study: optuna.Study, recipe: RunRecipe) -> ChosenStudent:
    """The front point the recipe asks for: lowest error within the budget, or the fastest."""
    points = list(front.points)
    if not points:
        raise ConfigError(
            "the search produced no feasible student (every trial failed or exceeded the latency budget); "
            "raise search.budget_ms or search.n_trials"
        )
    key = (lambda p: p.metrics["latency_ms"]) if recipe.distill.choose == "fastest" else (lambda p: p.metrics["epe"])
    best = min(points, key=key)
    attrs = study.trials[best.number].user_attrs
    return ChosenStudent(trial=best.number, metrics=dict(best.metrics), config=attrs.get("student_config"),
                         student_path=attrs.get("student_path"))


def front_rows(front: ParetoFront, study: optuna.Study) -> list[FrontRow]:
    """The front's students, fastest first, as the final table shows them."""
    rows = []
    for p in front.points:
        m, attrs = p.metrics, study.trials[p.number].user_attrs
        rows.append(FrontRow(trial=p.number, epe_vs_teacher=m.get("teacher_epe"), epe_vs_gt=m.get("gt_epe"),
                             iters=(attrs.get("student_config") or {}).get("iters"),  # scored and MACs counted at
                             latency_ms=m.get("latency_ms"), gmacs=m.get("gmacs"), mparams=m.get("mparams"),
                             student_path=attrs.get("student_path")))
    return sorted(rows, key=lambda r: r.latency_ms or 0.0)
