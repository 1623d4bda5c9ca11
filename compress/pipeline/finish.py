"""The run's stages after the search: prune the chosen student, distil it longer, score it and export it."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from compress.data.datasets import build_dataset
from compress.distill.config import StudentSpec, from_label_cache
from compress.distill.trainer import distill
from compress.evaluation import evaluate_student
from compress.export import build_engine, to_onnx
from compress.latency_config import TimingConfig
from compress.prune import DataSpec, PruneConfig, PruneSettings, prune_to_budget, tracker_callback
from compress.prune.report import MODEL_DIR, RESULT_NAME
from compress.quantize import quantize_beside
from compress.structured import to_plain, translate_renamed
from compress.teacher_ref import TeacherRef
from compress.tracking import Tracker
from search_spaces import count_macs, load_student
from teacher import model_iters

from .context import labels_config, say
from .recipe import RunRecipe
from .records import ChosenStudent, StageRecord

PRUNE_LATENCY_KEYS = frozenset({f.name for f in dataclasses.fields(TimingConfig)} | {"measure"})
"""The latency settings pruning reads: how a model is timed, and when (``measure``); the predictor's and the final
table's settings do not change the pruned model."""


def prune_key(config: dict[str, Any]) -> dict[str, Any]:
    """A prune config without what does not change the pruned model (progress display, device name, the latency
    settings pruning does not read)."""
    out = {k: v for k, v in config.items() if k not in ("progress", "device")}
    if "teacher_iters" in out.get("distill", {}):  # recorded before it became the prune config's teacher_iters
        out["distill"] = {k: v for k, v in out["distill"].items() if k != "teacher_iters"}
        out.setdefault("teacher_iters", config["distill"]["teacher_iters"])
    if not isinstance(out.get("teacher"), dict):  # recorded before the teacher was a TeacherRef (a path)
        out["teacher"] = to_plain(TeacherRef(checkpoint=out.get("teacher"), iters=out.pop("teacher_iters", None)))
    out["latency"] = {k: v for k, v in out.get("latency", {}).items() if k in PRUNE_LATENCY_KEYS}
    return out


def prune_chosen(recipe: RunRecipe, run_dir: Path, student_path: Path, teacher_model: torch.nn.Module, device,
                 tracker: Tracker) -> tuple[Path, dict[str, Any]]:
    """Prune the chosen student to the recipe's budget, distilling from the teacher (reused on a re-run)."""
    p, train = recipe.prune, recipe.data.train
    out = run_dir / "prune"
    cfg = PruneConfig(  # the stage's settings, on the recipe's training data (its first p.samples) and latency
        **{f.name: getattr(p, f.name) for f in dataclasses.fields(PruneSettings)},
        model=str(student_path), teacher=TeacherRef(iters=recipe.teacher.iters), run_dir=str(out), seed=recipe.seed,
        device=str(device), progress=recipe.progress, latency=recipe.search.latency,
        data=DataSpec(**{**vars(train), "limit": min(p.samples, train.limit or p.samples)},
                      size=[recipe.height, recipe.width], eval_samples=min(2, p.samples)),
    )
    model_dir = out / MODEL_DIR
    # prune_to_budget writes the record; its key is the settings it pruned with
    previous = StageRecord(out / RESULT_NAME, prune_key(cfg.to_dict()),
                           key_of=lambda saved: prune_key(saved.get("config", {}))).load()
    if previous is not None and (model_dir / "config.yaml").is_file():
        say(recipe, f"prune: reusing {model_dir} (same settings)")
        return model_dir, prune_summary(previous)
    if previous is None and not (out / RESULT_NAME).is_file() and out.is_dir() and any(out.iterdir()):
        # prune_to_budget writes its record last: files without it are a stopped run's, and pruning has no resume
        say(recipe, "prune: an earlier run stopped mid-way; pruning again from the start", force=True)
    stale = run_dir / "final"
    if stale.exists():  # it was distilled from another starting point; its checkpoints must not be resumed
        say(recipe, f"prune: pruning anew, so the final distillation in {stale} starts over")
        shutil.rmtree(stale)
    result = prune_to_budget(cfg, teacher=teacher_model,
                             callbacks=[tracker_callback(tracker)] if tracker.parent_run_id else [])
    summary = prune_summary(result.to_dict())
    if not result.met:
        say(recipe, f"prune: budget {result.budget_kind} <= {result.budget_value:g} NOT met after "
                    f"{len(result.steps)} step(s); going on with the smallest model reached")
    return Path(result.model_path), summary


def prune_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The summary's ``pruned`` entry from a prune_result.json."""
    ev = result.get("evaluation", {})
    return {"budget": f"{result['budget_kind']} <= {result['budget_value']:g}", "met": result["met"],
            "steps": len(result["steps"]), "gmacs": [result["initial"]["gmacs"], result["final"]["gmacs"]],
            "mparams": [result["initial"]["mparams"], result["final"]["mparams"]],
            "teacher_epe": [ev.get(k, {}).get("teacher/epe") for k in ("unpruned", "before_recovery",
                                                                        "after_recovery")],
            "path": result.get("model_path")}


def final_distill(recipe: RunRecipe, run_dir: Path, chosen: ChosenStudent, labels_dir: Path, device,
                  start: Path | None = None) -> Path:
    """Distil the chosen student longer, starting from its search-trial (or pruned) weights."""
    d = recipe.distill
    cfg_iters = int(chosen.config["iters"])
    start = Path(start or chosen.student_path)
    try:
        recorded = yaml.safe_load((run_dir / "final" / "config.yaml").read_text())["student"]
        previous = translate_renamed(StudentSpec, recorded).get("model")  # a record before the rename too
    except (OSError, KeyError, TypeError, AttributeError, yaml.YAMLError):
        previous = None
    if previous is not None and previous != str(start):  # e.g. pruning switched on or off since
        say(recipe, f"final distillation starts from {start} now (was {previous}); starting it over")
        shutil.rmtree(run_dir / "final")
    dc = from_label_cache(
        run_dir / "final", StudentSpec(kind="search_space", model=str(start)), recipe.data.train,
        labels_dir, labels_config(recipe), cfg_iters, crop_size=recipe.data.crop_size, seed=recipe.seed,
        steps=d.steps, batch_size=d.batch_size,
        amp="bf16", device=str(device), log_every=max(1, d.steps // 10), checkpoint_every=max(1, d.steps // 4),
        progress=recipe.progress, loss=recipe.loss, optim=recipe.optim,
    )
    return Path(distill(dc).student_path)


def score_student(path: Path, recipe: RunRecipe, eval_set, device) -> dict[str, Any]:
    """Held-out accuracy and cost of a saved student (latency: see report_latencies)."""
    model = load_student(path, device=device)
    iters = model_iters(model)
    scores = evaluate_student(model, eval_set, iters=iters, device=device)
    cost = count_macs(model, recipe.height, recipe.width, iters=iters)
    return {**scores, "iters": iters, "gmacs": cost.gmacs, "mparams": cost.params / 1e6, "path": str(path)}


def export_student(path: Path, recipe: RunRecipe, run_dir: Path) -> dict[str, str]:
    """ONNX (and TensorRT when asked and available) of the final student."""
    model = load_student(path)
    out: dict[str, str] = {}
    onnx_path = run_dir / "export" / "student.onnx"
    report = to_onnx(model, onnx_path, recipe.height, recipe.width, iters=model.cfg.iters, opset=recipe.export.opset)
    out["onnx"] = str(report.path)
    if "onnx_int8" in recipe.export.formats:
        calib = build_dataset(recipe.data.train, seed=recipe.seed)  # the frames the label cache was made from
        heldout = build_dataset(recipe.data.eval, seed=recipe.seed + 1)
        out["onnx_int8"] = str(quantize_beside(onnx_path, calib, recipe.export.quantize, heldout=heldout,
                                               progress=recipe.progress).path)
    if "engine" in recipe.export.formats:
        info = build_engine(onnx_path, run_dir / "export" / "student.engine", precision=recipe.export.precision)
        out["engine"] = str(info.engine_path) if hasattr(info, "engine_path") else str(run_dir / "export")
    return out
