"""Recipe subcommands: ``ffsc run``, ``ffsc nas`` (workers), ``ffsc distill``, ``ffsc eval``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from compress.device import pick_device

from .common import console, recipe_from_args


def _recipe(args: argparse.Namespace, load=None):
    from compress.pipeline import load_run_recipe

    return recipe_from_args(args, load or load_run_recipe)


def cmd_run(args: argparse.Namespace) -> int:
    """Run a recipe's stages (teacher -> search -> prune -> distill -> export)."""
    from compress.pipeline import run_recipe

    run_recipe(_recipe(args), start_over=args.start_over)
    return 0


def cmd_nas(args: argparse.Namespace) -> int:
    """Only the search stage: create the study, or join it as a worker (several processes or machines)."""
    import dataclasses

    from compress.pipeline.run import (
        describe_latency,
        latency_settings,
        preflight,
        prepare_labels,
        quiet_third_party,
        resolve_run_dir,
        run_search,
    )
    from compress.pipeline.teacher_stage import get_teacher
    from compress.tracking import Tracker

    quiet_third_party()
    recipe = _recipe(args)
    if args.run_dir:
        recipe = dataclasses.replace(recipe, run_dir=args.run_dir)
    if args.worker and not recipe.run_dir:
        from compress.errors import ConfigError

        raise ConfigError("--worker needs --run-dir (the run directory the study was created in, shared by workers)")
    recipe, choice = preflight(recipe)  # each worker checks its own machine before it writes anything
    console().print(f"latency: {describe_latency(latency_settings(recipe.search.latency))} ({choice.reason})")
    run_dir = resolve_run_dir(recipe)
    recipe = dataclasses.replace(recipe, run_dir=str(run_dir))
    device = pick_device(recipe.device)
    teacher = get_teacher(recipe, run_dir, device)
    labels_dir, eval_set = prepare_labels(recipe, run_dir, teacher, device)
    tracker = Tracker(run_dir, tracking_uri=recipe.tracking.uri, experiment=recipe.tracking.experiment,
                      teacher=teacher.identity)
    n_trials = 0 if args.create_only else None
    if n_trials == 0:
        from compress.nas.storage import make_storage
        from compress.nas.study import create_study
        from compress.pipeline.run import study_spec, with_budget

        recipe = with_budget(recipe, run_dir, teacher.model, device)
        create_study(study_spec(recipe), make_storage(args.storage or recipe.search.storage, run_dir))
        console().print(f"study {study_spec(recipe).name} ready in {args.storage or run_dir}; start workers with "
                        f"ffsc nas ... --worker --run-dir {run_dir}")
        return 0
    result = run_search(recipe, run_dir, labels_dir, eval_set, device, tracker, teacher, args.storage,
                        worker_id=args.worker_id, choice=choice)
    console().print(f"{result.ran} trials run here; study has {result.n_complete} complete, {result.n_failed} "
                    f"failed; front of {len(result.front.points)} in {run_dir / 'search'}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    """Distil a student from the teacher as a distill recipe says (``torchrun ... -m compress.cli distill``: DDP)."""
    import os

    from compress.distill import distill, load_recipe
    from compress.preflight import check_distill

    cfg = _recipe(args, load_recipe)
    check_distill(cfg)
    result = distill(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {**result.train_losses, **{f"eval/{k}": v for k, v in result.eval_metrics.items()}}
        print(json.dumps({"student": str(result.student_path), "steps": result.steps, **summary}, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """EPE/D1/bad-pixel of a model on a dataset; prints a table and writes JSON."""
    from rich.table import Table

    from compress.atomic import atomic_write_text
    from compress.data.readers import open_dataset
    from compress.evaluation import evaluate_student
    from compress.models import resolve_model
    from teacher import model_iters

    device = pick_device(args.device)
    model_path = Path(args.model)
    resolved = resolve_model(model_path)
    model = resolved.module.to(device)
    iters = model_iters(model, args.iters, key="--iters")
    dataset = open_dataset(args.data, kind=args.kind)
    records = getattr(dataset, "records", None)
    no_gt = records is not None and not any(r.disp is not None for r in records)
    if no_gt and not args.teacher:
        from compress.errors import DataError

        raise DataError(f"--data {args.data}: none of its {len(records)} pairs has a ground-truth disparity, so there "
                        "is nothing to score against; give --teacher MODEL to score against a teacher's disparity")
    teacher = teacher_iters = None
    if args.teacher:
        resolved_teacher = resolve_model(Path(args.teacher))
        teacher = resolved_teacher.module.to(device).eval()
        teacher_iters = model_iters(teacher, args.teacher_iters, key="--teacher-iters")
    if args.limit:
        from torch.utils.data import Subset

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
