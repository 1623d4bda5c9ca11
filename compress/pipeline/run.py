"""``ffsc run``: a recipe's stages in order, in one run directory, resumable.

The stages live beside this module (context: checks, teacher and labels; search; finish: prune, distil, score and
export; report: latencies and real pairs); this one orders them and owns the study's MLflow run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

from compress.real_pairs import load_real_pairs
from compress.run_lock import RunDirLock
from search_spaces import count_macs

from .context import (
    RunContext,
    check_start_over,
    claim_run_dir,
    describe_teacher,
    prepare_run,
    record_recipe,
    say,
    teacher_iters,
)
from .finish import export_student, final_distill, prune_chosen, score_student
from .recipe import RunRecipe
from .records import RunSummary, WallTime
from .report import describe_latency, latency_settings, report_latencies, score_real_pairs
from .search import choose_student, front_rows, run_search


def run_recipe(recipe: RunRecipe, storage_url: str | None = None, start_over: bool = False) -> RunSummary:
    """Run every stage the recipe switches on, holding the run directory's lock; a re-run on the same run directory
    resumes (``start_over``: clears it first). Writes summary.json; printing it is the caller's."""
    start = time.perf_counter()
    ctx = prepare_run(recipe)  # before anything is written or trained
    if start_over:
        check_start_over(ctx.run_dir)  # a folder that is no run directory: refused before the lock file is made
    with RunDirLock(ctx.run_dir, say=lambda m: say(ctx.recipe, m, force=True)):
        claim_run_dir(ctx.recipe, ctx.run_dir, start_over)
        # Recorded only now that the stages start: a refused call leaves a finished run's record as it was.
        record_recipe(ctx.recipe, ctx.run_dir)
        clock = WallTime.open(ctx.run_dir, start)  # after claim_run_dir: --start-over starts the count again
        try:
            return _run_stages(ctx, storage_url, clock)
        finally:
            with contextlib.suppress(OSError):  # the stage's own error, if any, is the one to show
                clock.end()  # a failed or interrupted call's time counts too (a no-op after a finished call)


def _run_stages(ctx: RunContext, storage_url: str | None, clock: WallTime) -> RunSummary:
    recipe, run_dir, device = ctx.recipe, ctx.run_dir, ctx.device
    ctx.say(f"run directory {run_dir} on {device}")
    settings = latency_settings(recipe.search.latency, device)
    ctx.say(f"latency: {describe_latency(settings)} ({ctx.choice.reason})")
    summary = RunSummary(run_dir=run_dir, latency_backend=dataclasses.asdict(ctx.choice), latency=settings)

    ctx.open_teacher()
    teacher, tracker = ctx.teacher, ctx.tracker
    summary.teacher = describe_teacher(ctx)  # labelled, scored, counted and timed at its iterations
    cost = count_macs(teacher.model, recipe.height, recipe.width, iters=teacher_iters(recipe, teacher.model))
    summary.teacher.update({"gmacs": cost.gmacs, "mparams": cost.params / 1e6})

    real_pairs = load_real_pairs(recipe.real_pairs, say=ctx.say)
    # The with block owns the study's MLflow run: the search opens it, the final student is logged into it, and
    # it ends here (FAILED on an error, KILLED on Ctrl-C).
    with tracker:
        if recipe.search.enabled:
            result = run_search(ctx, storage_url)
            summary.front = front_rows(result.front, result.study)
            summary.chosen = chosen = choose_student(result.front, result.study, recipe)
            ctx.say(f"search: {result.n_complete} trials complete, {result.n_failed} failed, "
                    f"front of {len(summary.front)}; chose trial {chosen.trial}")
            final_path = Path(chosen.student_path)
            if recipe.prune.enabled:
                final_path, summary.pruned = prune_chosen(recipe, run_dir, final_path, teacher.model, device, tracker)
                g = summary.pruned["gmacs"]
                ctx.say(f"prune: {summary.pruned['budget']} {'met' if summary.pruned['met'] else 'NOT met'} in "
                        f"{summary.pruned['steps']} step(s), {g[0]:.3g} -> {g[1]:.3g} GMACs")
            if recipe.distill.enabled:
                final_path = final_distill(recipe, run_dir, chosen, ctx.labels_dir, device, start=final_path)
            summary.final = score_student(final_path, recipe, ctx.eval_set, device)
            if recipe.export.enabled:
                summary.exports = export_student(final_path, recipe, run_dir)
        report_latencies(summary, recipe, teacher.model, device, run_dir)
        score_real_pairs(summary, recipe, teacher.model, real_pairs, device)
        if summary.final is not None and tracker.parent_run_id:
            _log_final(ctx, summary, final_path)
    ended = clock.end()
    summary.seconds, summary.seconds_total, summary.calls = ended["seconds"], ended["seconds_total"], ended["calls"]
    summary.write(run_dir / "summary.json")
    return summary


def _log_final(ctx: RunContext, summary: RunSummary, final_path: Path) -> None:
    """The final student's metrics, config and the front's plot on the study's MLflow run."""
    tracker = ctx.tracker
    tracker.log_metrics({f"final/{k}".replace("/", "_"): v for k, v in summary.final.items() if isinstance(v, float)})
    if summary.real_pairs:
        tracker.log_metrics({f"real_{name.replace(' ', '_')}_{k}": v
                             for name, scores in summary.real_pairs["scores"].items()
                             for k, v in scores["mean"].items() if k in ("epe", "bp2")})
    tracker.log_artifact(final_path / "config.yaml", "final_student")
    front_png = ctx.run_dir / "search" / "pareto_front.png"
    tracker.log_overview(f"{ctx.recipe.name}: final student (front trial {summary.chosen.trial})",
                         summary.final, final_path / "config.yaml", front_png if front_png.exists() else None)
