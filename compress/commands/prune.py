"""``ffsc prune``: structured pruning of a student or the teacher's refinement to a latency/MAC/parameter budget."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.table import Table

from compress.errors import ConfigError
from compress.preflight import check_prune
from compress.prune import load_prune_config, prune_to_budget, resolve_prune_models, tracker_callback
from compress.prune.report import RESULT_NAME
from compress.run_lock import RunDirLock
from compress.tracking import ROLE_TAG, Tracker

from .common import console

# CLI flag -> PruneConfig key; values pass through as overrides on top of the recipe.
_FLAGS = {
    "model": "model", "teacher": "teacher.checkpoint", "out": "run_dir", "device": "device",
    "latency_device": "latency.device",
    **{flag: f"latency.{flag}" for flag in ("backend", "precision", "height", "width", "iters", "warmup", "repeats",
                                             "threads", "clock", "measure")},
    "data": "data.path", "data_kind": "data.kind",
    "samples": "data.num_samples", "importance": "importance.method", "step_ratio": "step_ratio",
    "max_steps": "max_steps", "round_to": "round_to", "max_ratio": "max_ratio",
    "distill_steps": "distill.steps_between", "recovery_steps": "distill.recovery_steps", "lr": "distill.optim.lr",
    "train_iters": "distill.train_iters", "teacher_iters": "teacher.iters", "recovery_recipe": "distill.recipe",
    "seed": "seed",
}
_BUDGETS = ("budget_ms", "budget_gmacs", "budget_mparams", "ratio")  # flags named as PruneConfig's budget keys


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """The ``key=value`` overrides the flags stand for (flags win over the recipe, trailing overrides over both)."""
    out = [f"{key}={getattr(args, flag)}" for flag, key in _FLAGS.items() if getattr(args, flag) is not None]
    given = [flag for flag in _BUDGETS if getattr(args, flag) is not None]
    if given:
        # One budget on the command line replaces whatever budget the recipe set.
        out += [f"{flag}={getattr(args, flag) if flag in given else 'null'}" for flag in _BUDGETS]
    if args.scope is not None:
        parts = [p.strip() for p in args.scope.split(",") if p.strip()]
        out.append(f"scope=[{','.join(parts)}]")
    if args.local_ranking:
        out.append("importance.global_ranking=false")
    if args.no_progress:
        out.append("progress=false")
    if args.no_mlflow:
        out.append("tracking.enabled=false")
    if args.tracking_uri:
        out.append(f"tracking.uri={args.tracking_uri}")
    return out + list(args.overrides)


def _prune_tracked(cfg, model, teacher):
    """prune_to_budget, logged to MLflow as one run (params: the config; metrics: every step) unless disabled."""
    if not cfg.tracking.enabled:
        return prune_to_budget(cfg, model, teacher)
    tracker = Tracker(cfg.run_dir, tracking_uri=cfg.tracking.uri, experiment=cfg.tracking.experiment)
    # A new MLflow run per invocation: a second prune into the same folder has its own params and steps.
    name = f"prune-{Path(cfg.run_dir).resolve().name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tracker.start_study_run(name, params=cfg.to_dict(),
                            tags={ROLE_TAG: "prune", "ffsc.model": cfg.model})
    with tracker:  # ends the run FAILED (or KILLED on Ctrl-C) when pruning raises
        result = prune_to_budget(cfg, model, teacher, callbacks=[tracker_callback(tracker)])
        tracker.log_metrics({"met": float(result.met), "final_gmacs": result.final["gmacs"],
                             "final_mparams": result.final["mparams"], "steps": float(len(result.steps))})
        tracker.log_artifact(Path(cfg.run_dir) / RESULT_NAME)
        if result.model_path:
            tracker.log_artifact(result.model_path, "model")
    return result


def recovery_verdict(before: float, after: float) -> str:
    """What the recovery did to the EPE against the teacher, in words: an error that rose is said, never hidden."""
    if after < before * 0.95:
        return "recovered"
    return "NOT recovered: worse after the recovery" if after > before else "barely changed"


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune to the budget, distil, save the model and prune_result.json; exit 1 if the budget was not met."""
    given = [flag for flag in _BUDGETS if getattr(args, flag) is not None]
    if len(given) > 1:
        raise ConfigError(f"pass one budget, got {', '.join('--' + g.replace('_', '-') for g in given)}")
    cfg = load_prune_config(args.recipe, overrides_from_args(args))
    if cfg.budget.kind is None:
        raise ConfigError("no budget: pass --budget-ms, --budget-gmacs, --budget-mparams or --ratio (or set one of "
                          "budget_ms, budget_gmacs, budget_mparams, ratio in the recipe)")
    cfg, choice = check_prune(cfg)  # before any model is loaded or anything written
    model, teacher = resolve_prune_models(cfg)  # an unusable model, teacher or scope: refused, nothing written yet
    if cfg.budget.kind == "latency_ms" or cfg.latency.measure == "always":
        console().print(f"latency: {choice.backend} on {choice.device} ({choice.reason})")
    # One prune at a time in a folder: a second would unlink the first's files under it. A prune starts over.
    with RunDirLock(cfg.run_dir, say=console().print, resumes=False):
        result = _prune_tracked(cfg, model, teacher)
    out = console()
    table = Table("", "before", "after", title=f"pruned {cfg.model} ({', '.join(cfg.scope)})")
    for key, label in (("gmacs", "GMACs"), ("mparams", "parameters (M)")):
        table.add_row(label, f"{result.initial[key]:.4g}", f"{result.final[key]:.4g}")
    if result.final.get("latency"):
        before = result.initial.get("latency") or {}
        after = result.final["latency"]
        table.add_row(f"latency median (ms, {after['backend']})", f"{before.get('median_ms', float('nan')):.4g}",
                      f"{after['median_ms']:.4g}")
    for name, ev in (("EPE vs teacher", "teacher/epe"),):
        vals = [result.evaluation[k].get(ev) for k in ("unpruned", "before_recovery", "after_recovery")]
        if all(v is not None for v in vals):
            table.add_row(name, f"{vals[0]:.4g}", f"{vals[1]:.4g} -> {vals[2]:.4g} "
                                                  f"({recovery_verdict(vals[1], vals[2])})")
    out.print(table)
    lat = result.final.get("latency")
    if lat:
        out.print(f"latency measured with {lat['backend']} on {lat['device']}, {lat['precision']}, shapes "
                  f"{lat['shapes']}, {lat['iters']} iterations, median of {lat['repeats']} runs after "
                  f"{lat['warmup']} warm-up")
    status = "met" if result.met else "NOT met"
    out.print(f"budget {result.budget_kind} <= {result.budget_value:g}: {status} after {len(result.steps)} step(s); "
              f"model -> {result.model_path}, report -> {cfg.run_dir}/prune_result.json")
    return 0 if result.met else 1


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``ffsc prune``."""
    p = sub.add_parser(
        "prune",
        help="prune a student (or the teacher's refinement) to a latency, MAC or parameter budget",
        description="Iteratively prune -> distil -> measure until the budget is met, then recover by "
        "distillation. Flags override the recipe's keys; trailing key=value pairs override both.",
    )
    p.add_argument("overrides", nargs="*", help="PruneConfig overrides, e.g. distill.optim.lr=5e-5 data.size=[320,640]")
    p.add_argument("--recipe", help="YAML recipe (see recipes/prune_to_budget.yaml)")
    p.add_argument("--model", help="saved student/pruned-teacher folder, teacher checkpoint, or preset:NAME")
    p.add_argument("--teacher", help="distillation teacher (same forms); default: the unpruned model itself")
    p.add_argument("--out", help="output folder (model/, prune_result.json, log.jsonl, config.yaml)")
    budget = p.add_argument_group("budget (exactly one)")
    budget.add_argument("--budget-ms", type=float, help="median latency of one forward, milliseconds")
    budget.add_argument("--budget-gmacs", type=float, help="MACs of one forward at --height x --width, x1e9")
    budget.add_argument("--budget-mparams", type=float, help="parameters, millions")
    budget.add_argument("--ratio", type=float, help="fraction of the in-scope channels to remove")
    lat = p.add_argument_group("measurement")
    lat.add_argument("--backend", choices=("auto", "torch", "onnxruntime", "tensorrt"),
                     help="auto: TensorRT, else PyTorch on CUDA with CUDA graphs, else ONNX Runtime on CPU")
    lat.add_argument("--height", type=int)
    lat.add_argument("--width", type=int)
    lat.add_argument("--iters", type=int, help="GRU iterations timed (default: the model's deployment count)")
    lat.add_argument("--precision", choices=("fp32", "fp16", "bf16"))
    lat.add_argument("--latency-device", help="device the latency is measured on (default: cuda if available)")
    lat.add_argument("--warmup", type=int)
    lat.add_argument("--repeats", type=int)
    lat.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    lat.add_argument("--clock", choices=("wall", "thread"), help="thread: one thread's CPU time (with --threads 1)")
    lat.add_argument("--measure", choices=("budget", "always", "never"), help="when to time the model")
    prune = p.add_argument_group("pruning")
    prune.add_argument("--scope", help="comma-separated parts: backbone,cost_filtering,refinement")
    prune.add_argument("--importance", choices=("taylor", "magnitude", "random"))
    prune.add_argument("--local-ranking", action="store_true", help="rank channels within each group only")
    prune.add_argument("--step-ratio", type=float, help="largest cost reduction per step")
    prune.add_argument("--max-steps", type=int)
    prune.add_argument("--round-to", type=int, help="pruned widths are multiples of this (default 8)")
    prune.add_argument("--max-ratio", type=float, help="largest fraction of any group's width removed")
    dist = p.add_argument_group("data and distillation")
    dist.add_argument("--data", help="dataset folder for calibration and distillation (default: synthetic)")
    dist.add_argument("--data-kind", help="dataset reader (default: auto)")
    dist.add_argument("--samples", type=int, help="number of samples used")
    dist.add_argument("--distill-steps", type=int, help="distillation steps between pruning steps")
    dist.add_argument("--recovery-steps", type=int, help="final recovery distillation steps")
    dist.add_argument("--lr", type=float)
    dist.add_argument("--train-iters", type=int, help="student GRU iterations while distilling")
    dist.add_argument("--teacher-iters", type=int, help="teacher GRU iterations for the targets")
    dist.add_argument("--recovery-recipe", help="run this compress.distill recipe as the recovery instead")
    p.add_argument("--device", help="device pruning and distillation run on (default: cuda if available)")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite mlflow.db in --out)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the run to MLflow")
    p.set_defaults(func=cmd_prune)
