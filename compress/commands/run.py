"""Recipe subcommands: ``ffsc run``, ``ffsc nas`` (workers), ``ffsc distill``, ``ffsc eval``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
from pathlib import Path

from rich.table import Table
from torch.utils.data import Subset

from compress.atomic import atomic_write_text
from compress.checks import require_at_least
from compress.data.readers import open_dataset
from compress.device import pick_device
from compress.distill import distill, load_recipe
from compress.errors import ConfigError
from compress.evaluation import evaluate_student
from compress.models import resolve_model
from compress.nas import create_study, make_storage
from compress.pipeline import RunContext, RunRecipe, RunSummary, load_run_recipe, prepare_run, run_recipe
from compress.pipeline.context import check_start_over, claim_run_dir, record_recipe, say
from compress.pipeline.report import describe_latency, latency_settings
from compress.pipeline.search import run_search, study_spec, with_budget
from compress.preflight import check_distill, check_ground_truth, check_storage, check_writable
from compress.run_lock import RunDirLock
from compress.tracking import Tracker
from teacher import model_iters

from .common import console, recipe_from_args


def _recipe(args: argparse.Namespace, load=None):
    return recipe_from_args(args, load or load_run_recipe)


def cmd_run(args: argparse.Namespace) -> int:
    """Run a recipe's stages (teacher -> search -> prune -> distill -> export) and print the final table."""
    recipe = _recipe(args)
    print_summary(run_recipe(recipe, start_over=args.start_over), recipe)
    return 0


def cmd_nas(args: argparse.Namespace) -> int:
    """Only the search stage: create the study, or join it as a worker (several processes or machines)."""
    recipe = _recipe(args)
    if args.run_dir:
        recipe = dataclasses.replace(recipe, run_dir=args.run_dir)
    if args.worker and not recipe.run_dir:
        raise ConfigError("--worker needs --run-dir (the run directory the study was created in, shared by workers)")
    if args.storage:
        check_storage(args.storage, key="--storage")
    ctx = prepare_run(recipe)  # each worker checks its own machine before it writes anything
    if args.worker:  # workers share the directory (the study's storage coordinates them): no lock, no record
        if args.start_over:
            raise ConfigError("--start-over deletes the shared run directory's results; a --worker joins them: "
                              "start over with the ffsc nas call that creates the study")
        claim_run_dir(ctx.recipe, ctx.run_dir)
        return _nas(ctx, args)
    if args.start_over:
        check_start_over(ctx.run_dir)  # a folder that is no run directory: refused before the lock file is made
    with RunDirLock(ctx.run_dir, say=lambda m: say(ctx.recipe, m, force=True)):
        # the resume check of `ffsc run`: a study of another recipe is refused
        claim_run_dir(ctx.recipe, ctx.run_dir, args.start_over)
        record_recipe(ctx.recipe, ctx.run_dir)
        return _nas(ctx, args)


def _nas(ctx: RunContext, args: argparse.Namespace) -> int:
    console().print(f"latency: {describe_latency(latency_settings(ctx.recipe.search.latency))} ({ctx.choice.reason})")
    ctx.open_teacher()
    run_dir = ctx.run_dir
    if args.create_only:
        spec = study_spec(with_budget(ctx.recipe, run_dir, ctx.teacher.model, ctx.device))
        create_study(spec, make_storage(args.storage or ctx.recipe.search.storage, run_dir))
        console().print(f"study {spec.name} ready in {args.storage or run_dir}; start workers with "
                        f"ffsc nas ... --worker --run-dir {run_dir}")
        return 0
    result = run_search(ctx, args.storage, worker_id=args.worker_id)
    console().print(f"{result.ran} trials run here; study has {result.n_complete} complete, {result.n_failed} "
                    f"failed; front of {len(result.front.points)} in {run_dir / 'search'}")
    return 0


def print_summary(summary: RunSummary, recipe: RunRecipe) -> None:
    """The final table: teacher, every front student and the final student."""

    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    t = summary.teacher
    settings = summary.latency or latency_settings(recipe.search.latency)
    latency_header = f"latency (ms, {describe_latency(settings, notes=False)}" + (
        ", timed side by side)" if settings["side_by_side"] else ")")
    real = summary.real_pairs
    real_cols = ["real EPE (px)", "real BP-2 (%)"] if real else []
    table = Table("model", "iters", "EPE vs GT (px)", "EPE vs teacher (px)", *real_cols, latency_header,
                  "GMACs", "params (M)", title=f"{recipe.name}: results at {recipe.height}x{recipe.width} "
                                               "(height x width)")

    def real_of(row: dict) -> list[str]:
        return [f(row.get("real_epe")), f(row.get("real_bp2"), "{:.1f}")] if real else []

    def iters_of(row: dict) -> str:
        """The count a row is scored and counted at, and the one it was timed at when that differs."""
        iters, timed = row.get("iters"), row.get("latency_iters")
        return f(iters, "{}") + (f" (timed at {timed})" if timed is not None and timed != iters else "")

    table.add_row("teacher", iters_of(t), f(t.get("gt/epe")), "0.00", *real_of(t), f(t.get("latency_ms")),
                  f(t.get("gmacs")), f(t.get("mparams")))
    if real and "sgbm" in real["scores"]:
        sg = real["scores"]["sgbm"]["mean"]
        table.add_row("OpenCV SGBM (real pairs only)", "-", "-", "-", f(sg["epe"]), f(sg["bp2"], "{:.1f}"), "-", "-",
                      "-")
    for front_row in summary.front:
        row = front_row.to_dict()
        table.add_row(f"front trial {row['trial']}", iters_of(row), f(row["epe_vs_gt"]), f(row["epe_vs_teacher"]),
                      *real_of(row), f(row["latency_ms"]) + (" (predicted)" if row.get("latency_mode") == "predicted"
                                                              else ""),
                      f(row["gmacs"]), f(row["mparams"], "{:.3f}"))
    if summary.final:
        fz = summary.final
        done = (["pruned"] if summary.pruned else []) + (["distilled"] if recipe.distill.enabled else [])
        label = f"final (trial {summary.chosen.trial}{', ' + ' + '.join(done) if done else ''})"
        table.add_row(f"[bold]{label}[/bold]", iters_of(fz), f(fz.get("gt/epe")),
                      f(fz.get("teacher/epe")), *real_of(fz), f(fz.get("latency_ms")), f(fz.get("gmacs")),
                      f(fz.get("mparams"), "{:.3f}"))
    out = console()
    out.print(table)
    if real:
        size = "x".join(map(str, real["size"]))
        line = f"real pairs: {', '.join(real['pairs'])} at {size}, held out (never trained on or chosen by)"
        if summary.final and "real_retention" in summary.final:
            line += (f"; the final student's BP-2 is {summary.final['real_retention']:.2f}x the teacher's "
                     "(retention: student BP-2 / teacher BP-2)")
        out.print(line)
    if summary.latency_backend:
        out.print(f"latency: {describe_latency(settings)} ({summary.latency_backend['reason']})")
    out.print(f"run directory: {summary.run_dir}")
    for name in ("search/pareto_front.png", "search/pareto_front.csv", "prune/model", "final/student",
                 "export/student.onnx", "mlflow.db"):
        if (summary.run_dir / name).exists():
            out.print(f"  {name}")
    if recipe.tracking.uri is None and (summary.run_dir / "mlflow.db").exists():
        tracker = Tracker(summary.run_dir, experiment=recipe.tracking.experiment)
        out.print(f"MLflow: mlflow ui --backend-store-uri sqlite:///{summary.run_dir / 'mlflow.db'}, then open "
                  f"{tracker.ui_url()}")
    elif recipe.tracking.uri is not None:
        out.print(f"MLflow: {recipe.tracking.uri}, experiment {recipe.tracking.experiment}")
    out.print(f"wall time {summary.seconds_total:.0f} s" + (
        f" over {summary.calls} calls ({summary.seconds:.0f} s in this one)" if summary.calls > 1 else ""))


def cmd_distill(args: argparse.Namespace) -> int:
    """Distil a student from the teacher as a distill recipe says (``torchrun ... -m compress.cli distill``: DDP)."""
    cfg = _recipe(args, load_recipe)
    check_distill(cfg)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    # The other ranks of one DDP job write into rank 0's folder, under its lock.
    with RunDirLock(cfg.run_dir) if rank0 else contextlib.nullcontext():
        result = distill(cfg)
    if rank0:
        summary = {**result.train_losses, **{f"eval/{k}": v for k, v in result.eval_metrics.items()}}
        print(json.dumps({"student": str(result.student_path), "steps": result.steps, **summary}, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """EPE/D1/bad-pixel of a model on a dataset; prints a table and writes JSON."""
    if args.limit is not None:
        require_at_least("--limit", args.limit, 1, "pairs to evaluate; leave it out to evaluate them all")
    if args.json:
        check_writable(args.json, key="--json")  # before the evaluation, not after it
    device = pick_device(args.device)
    model_path = Path(args.model)
    resolved = resolve_model(model_path)
    model = resolved.module.to(device)
    iters = model_iters(model, args.iters, key="--iters")
    dataset = open_dataset(args.data, kind=args.kind)
    if not args.teacher:
        check_ground_truth(args.data, args.kind, key="--data", why=", so there is nothing to score against; give "
                                                                   "--teacher MODEL to score against a teacher's "
                                                                   "disparity")
    teacher = teacher_iters = None
    if args.teacher:
        resolved_teacher = resolve_model(Path(args.teacher))
        teacher = resolved_teacher.module.to(device).eval()
        teacher_iters = model_iters(teacher, args.teacher_iters, key="--teacher-iters")
    if args.limit:
        dataset = Subset(dataset, range(min(args.limit, len(dataset))))
    metrics = evaluate_student(model, dataset, iters=iters, device=device, teacher=teacher,
                               teacher_iters=teacher_iters, progress=True)
    table = Table("metric", "value", title=f"{model_path.name} on {args.data} ({len(dataset)} pairs, {iters} iters)")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.3f}")
    console().print(table)
    if args.json:
        atomic_write_text(args.json, json.dumps({"model": str(model_path), "data": args.data, "iters": iters,
                                                 "metrics": metrics}, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the recipe subcommands."""
    p = sub.add_parser("run", help="run a recipe: teacher -> search -> prune -> distill -> export")
    p.add_argument("recipe", help="recipes/*.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. search.n_trials=20")
    p.add_argument("--start-over", action="store_true",
                   help="delete the run directory's earlier results first (a run of another recipe is refused "
                        "without it)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("nas", help="the search stage alone; --worker joins a shared study")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--storage", help="Optuna storage: sqlite path, journal:PATH, or postgresql://...")
    p.add_argument("--run-dir", help="run directory (shared by workers)")
    p.add_argument("--worker", action="store_true", help="join an existing study and run trials")
    p.add_argument("--worker-id", default=None)
    p.add_argument("--create-only", action="store_true", help="create the study (and labels) and exit")
    p.add_argument("--start-over", action="store_true",
                   help="delete the run directory's earlier results first (a run of another recipe is refused "
                        "without it)")
    p.set_defaults(func=cmd_nas)

    p = sub.add_parser("distill", help="distil a student (recipes/distill.yaml)")
    p.add_argument("recipe", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("eval", help="accuracy of a model on a dataset")
    p.add_argument("--model", required=True, help="a saved student or teacher (see ffsc export --model)")
    p.add_argument("--data", required=True, help="dataset root (layout detected)")
    p.add_argument("--kind", default="auto")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="write the metrics here")
    p.add_argument("--teacher", default=None,
                   help="also score against this model's disparity ('teacher/' metrics); data without ground "
                        "truth needs it")
    p.add_argument("--teacher-iters", type=int, default=None)
    p.set_defaults(func=cmd_eval)
