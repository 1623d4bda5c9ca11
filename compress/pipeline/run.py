"""``ffsc run``: a recipe's stages in order, in one run directory, resumable, with a final table.

Slightly over the ~500-line guide: the stages of one run, each a short function, read top to bottom in the
order they run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from compress.atomic import atomic_write_text
from compress.backends import get_backend
from compress.device import pick_device
from compress.errors import ConfigError
from compress.structured import dump_yaml
from teacher import model_iters

from .recipe import RunRecipe
from .teacher_stage import get_teacher


@dataclass
class RunSummary:
    """What a run produced (also written to run_dir/summary.json)."""

    run_dir: Path
    teacher: dict[str, Any] = field(default_factory=dict)
    front: list[dict[str, Any]] = field(default_factory=list)
    chosen: dict[str, Any] | None = None
    pruned: dict[str, Any] | None = None
    final: dict[str, Any] | None = None
    exports: dict[str, str] = field(default_factory=dict)
    latency_backend: dict[str, Any] = field(default_factory=dict)
    """The backend the run timed on, and why ('auto' resolved on this machine)."""
    latency: dict[str, Any] = field(default_factory=dict)
    """What the table's latencies were timed with (see :func:`latency_settings`); each row also names its own
    ``latency_iters``, ``latency_backend``, ``latency_precision`` and ``latency_mode``."""
    real_pairs: dict[str, Any] = field(default_factory=dict)
    """Scores on labelled real pairs (see :func:`score_real_pairs`); reported, never used to train or choose."""
    seconds: float = 0.0
    """Wall time of this call of ``ffsc run``."""
    seconds_total: float = 0.0
    """Wall time over every call on this run directory (a resume adds to the earlier calls'; see WallTime)."""
    calls: int = 1
    """Calls of ``ffsc run`` on this run directory since it was started (or started over)."""


WALL_TIME_RECORD = "wall_time.json"


@dataclass
class WallTime:
    """The run's wall time over all its calls: earlier calls' seconds are read from run_dir/wall_time.json, and
    this call's are added once when it ends (finished, failed or interrupted)."""

    path: Path
    start: float
    earlier_seconds: float = 0.0
    earlier_calls: int = 0
    ended: dict[str, float] | None = None

    @classmethod
    def open(cls, run_dir: Path, start: float) -> WallTime:
        """The record of ``run_dir`` (zero calls when it has none or it is unreadable), this call started at
        ``start`` (a ``time.perf_counter()`` value)."""
        path = run_dir / WALL_TIME_RECORD
        try:
            saved = json.loads(path.read_text())
            return cls(path, start, float(saved["seconds_total"]), int(saved["calls"]))
        except (OSError, ValueError, KeyError, TypeError):
            return cls(path, start)

    def end(self) -> dict[str, float]:
        """This call's and the total seconds and the number of calls, recorded (atomically) on the first call."""
        if self.ended is None:
            seconds = time.perf_counter() - self.start
            self.ended = {"seconds": seconds, "seconds_total": self.earlier_seconds + seconds,
                          "calls": self.earlier_calls + 1}
            atomic_write_text(self.path, json.dumps(self.ended, indent=2))
        return self.ended


def quiet_third_party() -> None:
    """Keep the console to ffsc's own progress: no per-trial Optuna lines, no tracer chatter on export."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", message=".*instance_norm.*train=True.*")


def resolve_run_dir(recipe: RunRecipe) -> Path:
    """The recipe's run directory (created), defaulting to runs/<name>-<time>."""
    if recipe.run_dir:
        path = Path(recipe.run_dir)
    else:
        path = Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def preflight(recipe: RunRecipe):
    """Check everything that can be checked before any work (nothing is written): the device, the latency
    backend ('auto' resolved), the teacher checkpoint, data folders and the run directory. Returns the recipe
    with its latency backend resolved, and the BackendChoice."""
    from compress import preflight as pf

    pick_device(recipe.device)  # a device this machine lacks is one line, here
    lat, choice = recipe.search.latency.resolved()
    pf.check_latency(lat, key="search.latency")
    if recipe.teacher.checkpoint:
        pf.check_checkpoint(recipe.teacher.checkpoint, key="teacher.checkpoint",
                            trust_pickle=recipe.teacher.trust_checkpoint)
    elif recipe.teacher.stand_in == "train":
        from search_spaces import preset

        preset(recipe.teacher.fallback_preset, **recipe.teacher.fallback_overrides)  # unknown: lists the presets
    else:
        from .standin import SHIPPED_DIR

        where = SHIPPED_DIR if recipe.teacher.stand_in == "shipped" else Path(recipe.teacher.stand_in).expanduser()
        pf.check_checkpoint(where, key="teacher.stand_in")
    if "search" in recipe.stages and recipe.search.enabled:
        parent = search_parent(recipe, _teacher_folder(recipe))
        if parent is not None:
            pf.check_checkpoint(parent, key="search.parent")
        trained_here = recipe.teacher.stand_in == "train" and not recipe.teacher.checkpoint
        # A stand-in trained in the run, as the parent, is checked once it exists.
        if not (trained_here and recipe.search.parent in ("auto", "teacher")):
            search_space(recipe, parent)  # an unknown space, or a choice the parent cannot supply: one line here
    for entry in recipe.real_pairs.pairs if recipe.real_pairs.enabled else []:
        if entry != "motorcycle":
            pf.check_dataset(entry, "auto", key="real_pairs.pairs")
    for name in ("train", "eval"):
        spec = getattr(recipe.data, name)
        if spec.path:
            pf.check_dataset(spec.path, spec.kind, key=f"data.{name}.path", options=spec.options)
    if "export" in recipe.stages and recipe.export.enabled and "engine" in recipe.export.formats:
        from compress.errors import MissingDependencyError

        gpu_problem = None if torch.cuda.is_available() else "PyTorch sees no CUDA GPU"
        if problem := get_backend("tensorrt").available() or gpu_problem:
            raise MissingDependencyError(f"export.formats={recipe.export.formats}: a TensorRT engine cannot be built "
                                         f"here ({problem}); export 'onnx' only (export.formats=[onnx]) and build "
                                         "the engine on the target with `ffsc export`, or run on a CUDA machine with "
                                         "TensorRT")
        pf.check_tensorrt_precision(recipe.export.precision, "export.precision")
    pf.check_writable(recipe.run_dir or "runs", key="run_dir")
    if lat.mode == "predicted":
        from compress.latency_predictor import open_table

        table = open_table(lat)  # a damaged table file fails here, not after the labelling
        pf.check_writable(table.path, key="search.latency.table")
    search = dataclasses.replace(recipe.search, latency=lat)
    return dataclasses.replace(recipe, search=search), choice


PARENT_KEYWORDS = ("auto", "teacher", "largest")


def _teacher_folder(recipe: RunRecipe) -> Path | None:
    """The saved student folder of a stand-in teacher known before the run (None: official, or trained here)."""
    if recipe.teacher.checkpoint or recipe.teacher.stand_in == "train":
        return None
    from .standin import SHIPPED_DIR

    return SHIPPED_DIR if recipe.teacher.stand_in == "shipped" else Path(recipe.teacher.stand_in).expanduser()


def search_parent(recipe: RunRecipe, teacher_folder: Path | None) -> Path | None:
    """The trained parent whose sub-networks the search looks at (a saved student folder), or None for the space's
    largest member distilled in the run. ``teacher_folder``: the teacher's folder when it is of the student family."""
    parent = recipe.search.parent
    if recipe.search.proxy != "inherit":
        if parent not in PARENT_KEYWORDS:
            raise ConfigError(f"search.parent={parent}: a trained parent's weights start the trials of proxy "
                              f"'inherit', not of proxy {recipe.search.proxy!r}; set search.proxy=inherit")
        return None
    if parent == "largest":
        return None
    if parent in ("auto", "teacher"):
        if teacher_folder is None and parent == "teacher" and recipe.teacher.checkpoint:
            raise ConfigError("search.parent=teacher: the official FoundationStereo teacher is not of the student "
                              "family; use 'largest' (its largest student, distilled) or a saved student folder")
        return teacher_folder
    return Path(parent).expanduser()


def search_space(recipe: RunRecipe, parent: Path | None):
    """The space the search samples: the recipe's, laid over the trained parent when there is one."""
    from search_spaces import StudentConfig, load_space
    from search_spaces.serialization import CONFIG_NAME

    if parent is None:
        return load_space(recipe.search.space)
    cfg = StudentConfig.from_yaml(parent / CONFIG_NAME)
    return load_space(recipe.search.space, parent=cfg, parent_name=f"parent {parent}")


def _say(recipe: RunRecipe, message: str, force: bool = False) -> None:
    if recipe.progress or force:
        print(f"[ffsc] {message}", flush=True)


def _labels_config(recipe: RunRecipe):
    # What the cache stores; the teacher's iterations (teacher.iters) and the label size (data.size) are passed apart
    return recipe.data.labels


def prepare_labels(recipe: RunRecipe, run_dir: Path, teacher, device: torch.device):
    """Label the training and held-out sets once with the teacher; returns (train cache dir, eval dataset)."""
    from compress.data.datasets import build_dataset
    from compress.distill.label_cache import LabelledDataset, build_label_cache

    labels = _labels_config(recipe)
    out = {}
    for split, spec in (("train", recipe.data.train), ("eval", recipe.data.eval)):
        dataset = build_dataset(spec, seed=recipe.seed + (0 if split == "train" else 1))
        root = run_dir / "labels" / split
        build_label_cache(teacher.model, dataset, root, labels, iters=recipe.teacher.iters, size=recipe.data.size,
                          identity=teacher.identity, device=device, progress=recipe.progress)
        out[split] = (root, dataset)
    eval_set = LabelledDataset(out["eval"][1], out["eval"][0], seed=recipe.seed)
    return out["train"][0], eval_set


def teacher_scores(eval_set) -> dict[str, float]:
    """The teacher's own accuracy on the held-out set (its cached disparity against ground truth)."""
    from compress.metrics import MetricAccumulator

    acc = MetricAccumulator()
    for i in range(len(eval_set)):
        item = eval_set[i]
        if bool(item.get("has_gt", False)):
            acc.update(item["teacher_disp"][None].float(), item["disp"][None], item["valid"][None])
    return {f"gt/{k}": v for k, v in acc.compute().items()} if acc.num_images else {}


def _settings(recipe: RunRecipe, run_dir: Path, labels_dir: Path, eval_set, device: torch.device,
              parent: Path | None = None):
    from compress.nas.objective import TrialSettings

    s = recipe.search
    table = None
    if s.latency.mode == "predicted":
        from compress.latency_predictor import open_table

        table = open_table(s.latency)
    return TrialSettings(
        run_dir=run_dir, train_data=recipe.data.train, labels_dir=labels_dir, labels=_labels_config(recipe),
        eval_set=eval_set, height=recipe.height, width=recipe.width, distill_steps=s.distill_steps,
        batch_size=s.batch_size, loss=recipe.loss, optim=recipe.optim, error_metric=s.error_metric,
        latency=s.latency, device=str(device), seed=recipe.seed, latency_table=table, proxy=s.proxy,
        parent_steps=s.parent_steps, parent=parent, crop_size=recipe.data.crop_size,
    )


def study_spec(recipe: RunRecipe):
    """The Optuna study a recipe searches (same for every worker)."""
    from compress.nas.study import StudySpec

    s = recipe.search
    return StudySpec(name=f"{recipe.name}-search", metrics=("epe", "latency_ms"), directions=("minimize", "minimize"),
                     sampler=s.sampler, seed=s.seed, budget_ms=s.budget_ms, n_trials=s.n_trials,
                     timeout=s.timeout)


def check_predictor_once(recipe: RunRecipe, run_dir: Path, table, space) -> tuple[dict[str, str], float]:
    """Predicted against measured latency of a few sampled students, once per run (kept in
    search/predictor_check.json); says so when the predictor is off by more than the threshold here.
    Returns MLflow tags for the study's run and the calibration scale (median measured / predicted) that the
    search multiplies its predictions by."""
    from compress.latency_predictor import check_predictor

    lat = recipe.search.latency
    record = run_dir / "search" / "predictor_check.json"
    # Another machine (a worker), backend, precision, clock or size checks again.
    key = {"backend": lat.backend, "hardware": table.hardware, "precision": lat.precision, "clock": lat.clock,
           "size": [lat.height, lat.width], "students": lat.check_students, "seed": recipe.seed}
    try:
        saved = json.loads(record.read_text())
    except (OSError, ValueError):
        saved = None
    if saved is None or saved.get("key") != key:
        _say(recipe, f"latency predictor: checking it against {lat.check_students} measured students")
        evaluation = check_predictor(table, space, lat, lat.height, lat.width, seed=recipe.seed,
                                     progress=recipe.progress)
        if evaluation is None:
            return {}, 1.0
        saved = {"key": key, "median_abs_error": evaluation.median_abs_relative_error, "students": len(evaluation.rows),
                 "scale": evaluation.scale, "threshold": lat.max_predictor_error, "evaluation": evaluation.to_dict()}
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps(saved, indent=2))
    error = saved["median_abs_error"]
    _say(recipe, f"latency predictor: median |error| {error:.1%} over {saved['students']} students "
                 f"({lat.backend} on {table.hardware}, {lat.height}x{lat.width}); predictions are scaled by "
                 f"{saved['scale']:.3f}, the median measured / predicted of those students")
    if error > lat.max_predictor_error:
        _say(recipe, f"warning: the latency predictor is off by a median {error:.0%} here (threshold "
                     f"{lat.max_predictor_error:.0%}); the front may misplace students: consider "
                     "search.latency.mode=measured")
    tags = {"ffsc.predictor.median_abs_error": f"{error:.4f}", "ffsc.predictor.students": str(saved["students"]),
            "ffsc.predictor.scale": f"{saved['scale']:.4f}"}
    return tags, float(saved["scale"])


def run_search(recipe: RunRecipe, run_dir: Path, labels_dir: Path, eval_set, device, tracker, teacher_info,
               storage_url: str | None = None, worker_id: str | None = None, choice=None):
    """The NAS stage: a multi-objective study whose trials distil sampled students briefly."""
    from compress.nas.objective import StudentSearchObjective
    from compress.nas.storage import make_storage
    from compress.nas.study import run_study

    parent = search_parent(recipe, teacher_info.path if teacher_info.is_student else None)
    space = search_space(recipe, parent)
    if parent is not None:
        _say(recipe, f"search: sub-networks of {parent} (space {space.name}, {space.size()} members); every trial "
                     "starts from its weights")
    recipe = with_budget(recipe, run_dir, teacher_info.model, device)
    settings = _settings(recipe, run_dir, labels_dir, eval_set, device, parent=parent)
    settings.budget_ms = recipe.search.budget_ms
    objective = StudentSearchObjective(space, settings)
    storage = make_storage(storage_url or recipe.search.storage, run_dir)
    lat = recipe.search.latency
    tags = {"ffsc.teacher": teacher_info.description[:250], "ffsc.space": space.name,
            "ffsc.latency.backend": lat.backend, "ffsc.latency.mode": lat.mode}
    if choice is not None:
        tags["ffsc.latency.reason"] = choice.reason[:250]
    if settings.latency_table is not None:
        check_tags, settings.latency_scale = check_predictor_once(recipe, run_dir, settings.latency_table, space)
        tags.update(check_tags)
    return run_study(study_spec(recipe), storage, objective, tracker=tracker, worker_id=worker_id,
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
    from compress.latency import LatencyCache, measure

    lat, s = recipe.search.latency, recipe.search
    iters = _teacher_iters(recipe, teacher_model)
    key = {"backend": lat.backend, "size": [lat.height, lat.width], "precision": lat.precision, "iters": iters,
           "threads": lat.threads, "clock": lat.clock, "speedup": s.speedup}
    record = run_dir / "search" / "speedup_budget.json"
    try:
        saved = json.loads(record.read_text())
    except (OSError, ValueError):
        saved = None
    if saved is None or saved.get("key") != key:
        _say(recipe, f"search: timing the teacher for the {s.speedup:g}x speedup budget ({lat.backend}, "
                     f"{lat.precision}, {lat.height}x{lat.width}, {iters} iterations)")
        stats = measure(teacher_model, lat.backend, lat.height, lat.width, iters=iters, device=lat.device or device,
                        cache=LatencyCache(run_dir / "latency_cache.sqlite"), **lat.timing())
        saved = {"key": key, "teacher_ms": stats.median_ms, "budget_ms": stats.median_ms / s.speedup}
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps(saved, indent=2))
    _say(recipe, f"search: budget {saved['budget_ms']:.1f} ms, the teacher's {saved['teacher_ms']:.1f} ms over "
                 f"{s.speedup:g}; trials over it are timed, not distilled")
    return float(saved["budget_ms"])


def choose_student(front, study, recipe: RunRecipe) -> dict[str, Any]:
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
    return {"trial": best.number, "metrics": dict(best.metrics), "config": attrs.get("student_config"),
            "student_path": attrs.get("student_path")}


def prune_chosen(recipe: RunRecipe, run_dir: Path, student_path: Path, teacher_model: torch.nn.Module, device,
                 tracker) -> tuple[Path, dict[str, Any]]:
    """Prune the chosen student to the recipe's budget, distilling from the teacher (reused on a re-run)."""
    from compress.prune import DataSpec, PruneConfig, PruneSettings, prune_to_budget, tracker_callback
    from compress.prune.report import MODEL_DIR, RESULT_NAME

    p, train = recipe.prune, recipe.data.train
    out = run_dir / "prune"
    cfg = PruneConfig(  # the stage's settings, on the recipe's training data (its first p.samples) and latency
        **{f.name: getattr(p, f.name) for f in dataclasses.fields(PruneSettings)},
        model=str(student_path), teacher_iters=recipe.teacher.iters, run_dir=str(out), seed=recipe.seed,
        device=str(device), progress=recipe.progress,
        latency=recipe.search.latency,
        data=DataSpec(**{**vars(train), "limit": min(p.samples, train.limit or p.samples)},
                      size=[recipe.height, recipe.width], eval_samples=min(2, p.samples)),
    )
    model_dir = out / MODEL_DIR
    try:
        previous = json.loads((out / RESULT_NAME).read_text())
    except (OSError, ValueError):
        previous = None
    if (previous is not None and _prune_settings(previous.get("config", {})) == _prune_settings(cfg.to_dict())
            and (model_dir / "config.yaml").is_file()):
        _say(recipe, f"prune: reusing {model_dir} (same settings)")
        return model_dir, _prune_summary(previous)
    stale = run_dir / "final"
    if stale.exists():  # it was distilled from another starting point; its checkpoints must not be resumed
        _say(recipe, f"prune: pruning anew, so the final distillation in {stale} starts over")
        shutil.rmtree(stale)
    result = prune_to_budget(cfg, teacher=teacher_model,
                             callbacks=[tracker_callback(tracker)] if tracker.parent_run_id else [])
    summary = _prune_summary(result.to_dict())
    if not result.met:
        _say(recipe, f"prune: budget {result.budget_kind} <= {result.budget_value:g} NOT met after "
                     f"{len(result.steps)} step(s); going on with the smallest model reached")
    return Path(result.model_path), summary


def _prune_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A prune config without the keys that do not change the pruned model (progress display, device name, the
    latency settings pruning does not read)."""
    out = {k: v for k, v in config.items() if k not in ("progress", "device")}
    if "teacher_iters" in out.get("distill", {}):  # recorded before it became the prune config's teacher_iters
        out["distill"] = {k: v for k, v in out["distill"].items() if k != "teacher_iters"}
        out.setdefault("teacher_iters", config["distill"]["teacher_iters"])
    out["latency"] = {k: v for k, v in out.get("latency", {}).items() if k not in ("mode", "report_rounds")}
    return out


def _prune_summary(result: dict[str, Any]) -> dict[str, Any]:
    ev = result.get("evaluation", {})
    return {"budget": f"{result['budget_kind']} <= {result['budget_value']:g}", "met": result["met"],
            "steps": len(result["steps"]), "gmacs": [result["initial"]["gmacs"], result["final"]["gmacs"]],
            "mparams": [result["initial"]["mparams"], result["final"]["mparams"]],
            "teacher_epe": [ev.get(k, {}).get("teacher/epe") for k in ("unpruned", "before_recovery",
                                                                        "after_recovery")],
            "path": result.get("model_path")}


def final_distill(recipe: RunRecipe, run_dir: Path, chosen: dict[str, Any], labels_dir: Path, device,
                  start: Path | None = None) -> Path:
    """Distil the chosen student longer, starting from its search-trial (or pruned) weights."""
    from compress.distill.config import StudentSpec, from_label_cache
    from compress.distill.trainer import distill

    d = recipe.distill
    cfg_iters = int(chosen["config"]["iters"])
    start = Path(start or chosen["student_path"])
    try:
        previous = yaml.safe_load((run_dir / "final" / "config.yaml").read_text())["student"]["init_checkpoint"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        previous = None
    if previous is not None and previous != str(start):  # e.g. pruning switched on or off since
        _say(recipe, f"final distillation starts from {start} now (was {previous}); starting it over")
        shutil.rmtree(run_dir / "final")
    dc = from_label_cache(
        run_dir / "final", StudentSpec(kind="search_space", init_checkpoint=str(start)), recipe.data.train,
        labels_dir, _labels_config(recipe), cfg_iters, crop_size=recipe.data.crop_size, seed=recipe.seed,
        steps=d.steps, batch_size=d.batch_size,
        amp="bf16", device=str(device), log_every=max(1, d.steps // 10), checkpoint_every=max(1, d.steps // 4),
        progress=recipe.progress, loss=recipe.loss, optim=recipe.optim,
    )
    return Path(distill(dc).student_path)


def score_student(path: Path, recipe: RunRecipe, eval_set, device) -> dict[str, Any]:
    """Held-out accuracy and cost of a saved student (latency: see report_latencies)."""
    from compress.evaluation import evaluate_student
    from search_spaces import count_macs, load_student

    model = load_student(path, device=device)
    iters = model_iters(model)
    scores = evaluate_student(model, eval_set, iters=iters, device=device)
    cost = count_macs(model, recipe.height, recipe.width, iters=iters)
    return {**scores, "iters": iters, "gmacs": cost.gmacs, "mparams": cost.params / 1e6, "path": str(path)}


def report_latencies(summary: RunSummary, recipe: RunRecipe, teacher_model: torch.nn.Module, device,
                     run_dir: Path) -> None:
    """Latency of the teacher, every front student and the final student for the final table.

    With measured latency, all are timed together in alternating rounds: search-time latencies were taken minutes
    apart on a machine whose load drifts (they stay in the front's CSV and in ``search_latency_ms``). The result
    is kept in ``report_latency.json`` and reused while the models and settings are the same. With predicted
    latency (or ``report_rounds: 0``) the teacher and the final student are measured once each, cached.
    """
    from compress.latency import LatencyCache, measure, measure_together, model_hash
    from search_spaces import load_student

    lat = recipe.search.latency
    together = lat.mode == "measured" and lat.report_rounds > 0
    models = {"teacher": teacher_model.to(device).eval()}
    iters = {"teacher": _teacher_iters(recipe, teacher_model)}
    if together:
        for row in summary.front:
            path = row.get("student_path")
            if path and Path(path).is_dir():  # trials of other workers may live on other machines
                models[f"trial {row['trial']}"] = load_student(path, device=device)
    if summary.final:
        models["final"] = load_student(summary.final["path"], device=device)
    for name, model in models.items():
        if name not in iters:
            iters[name] = model_iters(model)  # the final table times each model at the count it is used with
    settings = {"backend": lat.backend, "height": lat.height, "width": lat.width, "precision": lat.precision,
                "warmup": lat.warmup, "repeats": lat.repeats, "threads": lat.threads,
                "device": str(lat.device or device), "iters": iters,
                **({"clock": lat.clock} if lat.clock != "wall" else {})}
    if together:
        key = hashlib.sha256(json.dumps({"models": {n: model_hash(m) for n, m in models.items()}, "settings": settings,
                                         "rounds": lat.report_rounds}, sort_keys=True).encode()).hexdigest()
        record = run_dir / "report_latency.json"
        try:
            saved = json.loads(record.read_text())
        except (OSError, ValueError):
            saved = {}
        if saved.get("key") == key:
            medians = saved["median_ms"]
        else:
            stats = measure_together(models, lat.backend, lat.height, lat.width, iters=iters, rounds=lat.report_rounds,
                                     device=lat.device or device, progress=recipe.progress, **lat.timing())
            medians = {name: st.median_ms for name, st in stats.items()}
            atomic_write_text(record, json.dumps({"key": key, "settings": settings, "median_ms": medians,
                                                  "stats": {n: st.to_dict() for n, st in stats.items()}}, indent=2))
    else:
        cache = LatencyCache(run_dir / "latency_cache.sqlite")
        medians = {name: measure(model, lat.backend, lat.height, lat.width, iters=iters[name],
                                 device=lat.device or device,
                                 cache=cache, **lat.timing()).median_ms
                   for name, model in models.items()}
    summary.latency = latency_settings(lat, device)
    timed_here = {"latency_backend": lat.backend, "latency_precision": lat.precision, "latency_mode": "measured"}
    summary.teacher.update(latency_ms=medians["teacher"], latency_iters=iters["teacher"], **timed_here)
    for row in summary.front:
        if (found := medians.get(f"trial {row['trial']}")) is not None:
            row["search_latency_ms"], row["latency_ms"] = row["latency_ms"], found
            row.update(latency_iters=iters[f"trial {row['trial']}"], **timed_here)
        else:  # the search's number: measured or predicted at search.latency.iters, else the student's own count
            row.update(latency_iters=lat.iters or row.get("iters"), latency_backend=lat.backend,
                       latency_precision=lat.precision, latency_mode=lat.mode)
    if summary.final:
        summary.final.update(latency_ms=medians["final"], latency_iters=iters["final"], **timed_here)


def latency_settings(lat, device: torch.device | str | None = None) -> dict[str, Any]:
    """What latencies are timed with: backend, device, precision, CPU threads (None on a GPU) and the rest."""
    dev = str(lat.device or device or "cpu")
    threads = None
    if dev.startswith("cpu"):  # threads matter on a CPU only
        threads = get_backend(lat.backend).threads(lat.threads)
    return {"backend": lat.backend, "device": dev, "precision": lat.precision, "threads": threads,
            "mode": lat.mode, "clock": lat.clock, "compile": lat.compile, "cuda_graph": lat.cuda_graph,
            "size": [lat.height, lat.width],
            "side_by_side": lat.mode == "measured" and lat.report_rounds > 0}


def describe_latency(settings: dict[str, Any], notes: bool = True) -> str:
    """One line of latency settings, e.g. 'onnxruntime on cpu, fp32, 2 threads' (``notes``: with caveats)."""
    parts = [f"{get_backend(settings['backend']).describe()} on {settings['device']}", settings["precision"]]
    cpu = settings["device"].startswith("cpu")
    if cpu:
        threads = settings["threads"]
        parts.append(f"{threads} thread{'' if threads == 1 else 's'}" if threads else "default threads")
    if notes and cpu and settings["precision"] != "fp32":  # said, not silently accepted
        parts.append(f"{settings['precision']} on a CPU runs as casts: not what a GPU's {settings['precision']} gives")
    parts += [name for key, name in (("compile", "compiled"), ("cuda_graph", "CUDA graphs")) if settings[key]]
    if settings["clock"] != "wall":
        parts.append(f"{settings['clock']} clock")
    if settings["mode"] == "predicted":
        parts.append("search rows predicted")
    return ", ".join(parts)


def score_real_pairs(summary: RunSummary, recipe: RunRecipe, teacher_model: torch.nn.Module, pairs, device) -> None:
    """EPE and BP-2 of the teacher, every front student, the final student and SGBM on the recipe's real pairs, and
    the final student's retention (its BP-2 over the teacher's). Reported only: nothing chooses by them."""
    from compress.real_pairs import retention, score_model, score_sgbm
    from search_spaces import load_student

    if not pairs:
        return
    _say(recipe, f"real pairs: scoring on {', '.join(p.name for p in pairs)} ({'x'.join(map(str, pairs[0].gt.shape))}"
                 f"{' and more' if len(pairs) > 1 else ''}; reported, never used to train or choose)")
    rows: dict[str, Any] = {"teacher": score_model(teacher_model, pairs, iters=_teacher_iters(recipe, teacher_model),
                                                   device=device)}
    if recipe.real_pairs.sgbm:
        sgbm = score_sgbm(pairs, threads=torch.get_num_threads(), say=lambda m: _say(recipe, m))
        if sgbm:
            rows["sgbm"] = sgbm
    for row in summary.front:
        path = row.get("student_path")
        if path and Path(path).is_dir():
            student = load_student(path)
            scores = score_model(student, pairs, iters=student.cfg.iters, device=device)
            rows[f"trial {row['trial']}"] = scores
            row["real_epe"], row["real_bp2"] = scores["mean"]["epe"], scores["mean"]["bp2"]
    teacher_bp2 = rows["teacher"]["mean"]["bp2"]
    summary.teacher["real_epe"], summary.teacher["real_bp2"] = rows["teacher"]["mean"]["epe"], teacher_bp2
    if summary.final:
        final_model = load_student(summary.final["path"])
        rows["final"] = score_model(final_model, pairs, iters=final_model.cfg.iters, device=device)
        final = rows["final"]["mean"]
        summary.final.update({"real_epe": final["epe"], "real_bp2": final["bp2"],
                              "real_retention": retention(final["bp2"], teacher_bp2)})
    summary.real_pairs = {"pairs": [p.name for p in pairs], "size": list(pairs[0].gt.shape), "scores": rows,
                          "metric": "dense EPE (px) and BP-2 (% of pixels off by > 2 px) on the visible ground truth"}


def _teacher_iters(recipe: RunRecipe, teacher_model: torch.nn.Module) -> int:
    """The teacher's GRU iterations: those it labels with (the one count it is timed, counted and scored at)."""
    return model_iters(teacher_model, recipe.teacher.iters, key="teacher.iters")


def export_student(path: Path, recipe: RunRecipe, run_dir: Path) -> dict[str, str]:
    """ONNX (and TensorRT when asked and available) of the final student."""
    from compress.export import to_onnx
    from search_spaces import load_student

    model = load_student(path)
    out: dict[str, str] = {}
    onnx_path = run_dir / "export" / "student.onnx"
    report = to_onnx(model, onnx_path, recipe.height, recipe.width, iters=model.cfg.iters, opset=recipe.export.opset)
    out["onnx"] = str(report.path)
    if "onnx_int8" in recipe.export.formats:
        from compress.data.datasets import build_dataset
        from compress.quantize import quantize_beside

        calib = build_dataset(recipe.data.train, seed=recipe.seed)  # the frames the label cache was made from
        heldout = build_dataset(recipe.data.eval, seed=recipe.seed + 1)
        out["onnx_int8"] = str(quantize_beside(onnx_path, calib, recipe.export.quantize, heldout=heldout,
                                               progress=recipe.progress).path)
    if "engine" in recipe.export.formats:
        from compress.export import build_engine

        info = build_engine(onnx_path, run_dir / "export" / "student.engine", precision=recipe.export.precision)
        out["engine"] = str(info.engine_path) if hasattr(info, "engine_path") else str(run_dir / "export")
    return out


def _front_rows(front, study) -> list[dict[str, Any]]:
    rows = []
    for p in front.points:
        m, attrs = p.metrics, study.trials[p.number].user_attrs
        rows.append({"trial": p.number, "epe_vs_teacher": m.get("teacher_epe"), "epe_vs_gt": m.get("gt_epe"),
                     "iters": (attrs.get("student_config") or {}).get("iters"),  # scored and MACs counted at
                     "latency_ms": m.get("latency_ms"), "gmacs": m.get("gmacs"), "mparams": m.get("mparams"),
                     "student_path": attrs.get("student_path")})
    return sorted(rows, key=lambda r: r["latency_ms"] or 0.0)


def print_summary(summary: RunSummary, recipe: RunRecipe) -> None:
    """The final table: teacher, every front student and the final student."""
    from rich.table import Table

    from compress.terminal import console

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

    def real_of(row: dict[str, Any]) -> list[str]:
        return [f(row.get("real_epe")), f(row.get("real_bp2"), "{:.1f}")] if real else []

    def iters_of(row: dict[str, Any]) -> str:
        """The count a row is scored and counted at, and the one it was timed at when that differs."""
        iters, timed = row.get("iters"), row.get("latency_iters")
        return f(iters, "{}") + (f" (timed at {timed})" if timed is not None and timed != iters else "")

    table.add_row("teacher", iters_of(t), f(t.get("gt/epe")), "0.00", *real_of(t), f(t.get("latency_ms")),
                  f(t.get("gmacs")), f(t.get("mparams")))
    if real and "sgbm" in real["scores"]:
        sg = real["scores"]["sgbm"]["mean"]
        table.add_row("OpenCV SGBM (real pairs only)", "-", "-", "-", f(sg["epe"]), f(sg["bp2"], "{:.1f}"), "-", "-",
                      "-")
    for row in summary.front:
        table.add_row(f"front trial {row['trial']}", iters_of(row), f(row["epe_vs_gt"]), f(row["epe_vs_teacher"]),
                      *real_of(row), f(row["latency_ms"]) + (" (predicted)" if row.get("latency_mode") == "predicted"
                                                              else ""),
                      f(row["gmacs"]), f(row["mparams"], "{:.3f}"))
    if summary.final:
        fz = summary.final
        done = (["pruned"] if summary.pruned else []) + (
            ["distilled"] if "distill" in recipe.stages and recipe.distill.enabled else [])
        label = f"final (trial {summary.chosen['trial']}{', ' + ' + '.join(done) if done else ''})"
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
    from compress.tracking import Tracker

    if recipe.tracking.uri is None and (summary.run_dir / "mlflow.db").exists():
        tracker = Tracker(summary.run_dir, experiment=recipe.tracking.experiment)
        out.print(f"MLflow: mlflow ui --backend-store-uri sqlite:///{summary.run_dir / 'mlflow.db'}, then open "
                  f"{tracker.ui_url()}")
    elif recipe.tracking.uri is not None:
        out.print(f"MLflow: {recipe.tracking.uri}, experiment {recipe.tracking.experiment}")
    out.print(f"wall time {summary.seconds_total:.0f} s" + (
        f" over {summary.calls} calls ({summary.seconds:.0f} s in this one)" if summary.calls > 1 else ""))


RESUME_CHECKED = ("seed", "height", "width", "data.", "teacher.", "search.", "loss.", "optim.")
"""Recipe keys whose change would mix two runs' results in one directory: the search's trials and the labels they
were distilled on have no stage of their own that redoes them. Prune, distill and export settings may change on a
resume (those stages are redone when theirs differ), as may the wall-clock and reporting keys below."""

RESUME_FREE = ("teacher.trust_checkpoint", "search.n_trials", "search.timeout", "search.storage",
               "search.latency.report_rounds")
"""Keys under RESUME_CHECKED that change no result: more trials extend the study, a longer timeout lets it go on."""

RECIPE_RECORD = "recipe.yaml"


def claim_run_dir(recipe: RunRecipe, run_dir: Path, start_over: bool = False) -> None:
    """Before the first stage: refuse a resume whose recipe differs from the recorded one in a key that changes
    results (or, with ``start_over``, clear the directory), then record this recipe."""
    from compress.run_lock import LOCK_NAME
    from compress.structured import read_yaml, to_plain
    from compress.tracking import flatten_params

    record = run_dir / RECIPE_RECORD
    if start_over:
        cleared = [p for p in run_dir.iterdir() if p.name != LOCK_NAME]
        for path in cleared:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        if cleared:
            _say(recipe, f"run directory {run_dir}: starting over ({len(cleared)} earlier entries removed)",
                 force=True)
    elif record.is_file():
        old = flatten_params(read_yaml(record, "recorded recipe"))
        new = flatten_params(to_plain(recipe))
        changed = [k for k in sorted(set(old) & set(new))  # a key only one side has: another ffsc version's
                   if old[k] != new[k] and k.startswith(RESUME_CHECKED) and not k.startswith(RESUME_FREE)]
        if changed:
            shown = ", ".join(f"{k}: {old[k]} -> {new[k]}" for k in changed[:4])
            raise ConfigError(
                f"run directory {run_dir} holds a run of another recipe ({shown}{' ...' if len(changed) > 4 else ''});"
                " resuming would mix the two. Use another run_dir, or add --start-over to delete its results and "
                "start again")
        _say(recipe, f"resuming run directory {run_dir}: finished stages are reused, unfinished ones go on", force=True)
    dump_yaml(recipe, record)


def run_recipe(recipe: RunRecipe, storage_url: str | None = None, start_over: bool = False) -> RunSummary:
    """Run every stage the recipe lists, holding the run directory's lock; a re-run on the same run directory
    resumes (``start_over``: clears it first)."""
    from compress.run_lock import RunDirLock

    start = time.perf_counter()
    quiet_third_party()
    recipe, choice = preflight(recipe)  # before anything is written or trained
    run_dir = resolve_run_dir(recipe)
    recipe = dataclasses.replace(recipe, run_dir=str(run_dir))
    with RunDirLock(run_dir, say=lambda m: _say(recipe, m, force=True)):
        claim_run_dir(recipe, run_dir, start_over)
        clock = WallTime.open(run_dir, start)  # after claim_run_dir: --start-over starts the count again
        try:
            return _run_stages(recipe, run_dir, choice, storage_url, clock)
        finally:
            with contextlib.suppress(OSError):  # the stage's own error, if any, is the one to show
                clock.end()  # a failed or interrupted call's time counts too (a no-op after a finished call)


def _run_stages(recipe: RunRecipe, run_dir: Path, choice, storage_url: str | None, clock: WallTime) -> RunSummary:
    from compress.tracking import Tracker
    from search_spaces import count_macs

    device = pick_device(recipe.device)
    torch.manual_seed(recipe.seed)
    _say(recipe, f"run directory {run_dir} on {device}")
    settings = latency_settings(recipe.search.latency, device)
    _say(recipe, f"latency: {describe_latency(settings)} ({choice.reason})")
    summary = RunSummary(run_dir=run_dir, latency_backend=dataclasses.asdict(choice), latency=settings)

    teacher = get_teacher(recipe, run_dir, device)
    _say(recipe, f"teacher: {teacher.description}")
    labels_dir, eval_set = prepare_labels(recipe, run_dir, teacher, device)
    teacher_iters = _teacher_iters(recipe, teacher.model)  # labelled, scored, counted and timed at
    summary.teacher = {"description": teacher.description, "path": str(teacher.path) if teacher.path else None,
                       "iters": teacher_iters, **teacher_scores(eval_set)}
    cost = count_macs(teacher.model, recipe.height, recipe.width, iters=teacher_iters)
    summary.teacher.update({"gmacs": cost.gmacs, "mparams": cost.params / 1e6})

    from compress.real_pairs import load_real_pairs

    real_pairs = load_real_pairs(recipe.real_pairs, say=lambda m: _say(recipe, m))
    tracker = Tracker(run_dir, tracking_uri=recipe.tracking.uri, experiment=recipe.tracking.experiment,
                      teacher=teacher.identity)
    with tracker:  # a failing stage ends the study's MLflow run FAILED (KILLED on Ctrl-C)
        if "search" in recipe.stages and recipe.search.enabled:
            result = run_search(recipe, run_dir, labels_dir, eval_set, device, tracker, teacher, storage_url,
                                choice=choice)
            summary.front = _front_rows(result.front, result.study)
            summary.chosen = choose_student(result.front, result.study, recipe)
            _say(recipe, f"search: {result.n_complete} trials complete, {result.n_failed} failed, "
                         f"front of {len(summary.front)}; chose trial {summary.chosen['trial']}")
            from compress.nas.study import UID_ATTR

            tracker.start_study_run(study_spec(recipe).name, params={}, tags={},
                                    study_key=result.study.user_attrs.get(UID_ATTR))
            final_path = Path(summary.chosen["student_path"])
            if "prune" in recipe.stages and recipe.prune.enabled:
                final_path, summary.pruned = prune_chosen(recipe, run_dir, final_path, teacher.model, device, tracker)
                g = summary.pruned["gmacs"]
                _say(recipe, f"prune: {summary.pruned['budget']} {'met' if summary.pruned['met'] else 'NOT met'} in "
                             f"{summary.pruned['steps']} step(s), {g[0]:.3g} -> {g[1]:.3g} GMACs")
            if "distill" in recipe.stages and recipe.distill.enabled:
                final_path = final_distill(recipe, run_dir, summary.chosen, labels_dir, device, start=final_path)
            summary.final = score_student(final_path, recipe, eval_set, device)
            if "export" in recipe.stages and recipe.export.enabled:
                summary.exports = export_student(final_path, recipe, run_dir)
        report_latencies(summary, recipe, teacher.model, device, run_dir)
        score_real_pairs(summary, recipe, teacher.model, real_pairs, device)
        if summary.final is not None and tracker.parent_run_id:
            tracker.log_metrics({f"final/{k}".replace("/", "_"): v for k, v in summary.final.items()
                                 if isinstance(v, float)})
            if summary.real_pairs:
                tracker.log_metrics({f"real_{name.replace(' ', '_')}_{k}": v
                                     for name, scores in summary.real_pairs["scores"].items()
                                     for k, v in scores["mean"].items() if k in ("epe", "bp2")})
            tracker.log_artifact(final_path / "config.yaml", "final_student")
            front_png = run_dir / "search" / "pareto_front.png"
            tracker.log_overview(f"{recipe.name}: final student (front trial {summary.chosen['trial']})",
                                 summary.final, final_path / "config.yaml", front_png if front_png.exists() else None)
    ended = clock.end()
    summary.seconds, summary.seconds_total, summary.calls = ended["seconds"], ended["seconds_total"], ended["calls"]
    atomic_write_text(run_dir / "summary.json", json.dumps(dataclasses.asdict(summary), indent=2, default=str))
    print_summary(summary, recipe)
    return summary
