"""What every command on a run recipe does before its stages: checks, run directory, device, teacher and labels.

``prepare_run`` is shared by ``ffsc run`` and ``ffsc nas``: it checks the recipe (nothing written), makes the run
directory and picks the device; ``RunContext.open_teacher`` then gets the teacher, labels the data once and opens
the MLflow tracker.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch

from compress import preflight as pf
from compress.backends import get_backend
from compress.data.datasets import build_dataset
from compress.device import pick_device
from compress.distill.config import LabelCacheConfig
from compress.distill.label_cache import LabelledDataset, build_label_cache
from compress.errors import ConfigError, MissingDependencyError
from compress.latency_config import BackendChoice
from compress.latency_predictor import open_table
from compress.metrics import MetricAccumulator
from compress.nas.storage import DEFAULT_JOURNAL_NAME, DEFAULT_SQLITE_NAME
from compress.run_lock import LOCK_NAME
from compress.structured import did_you_mean, dump_yaml, read_yaml, to_plain, translate_renamed
from compress.tracking import RUN_RECORD, Tracker, flatten_params
from search_spaces import SearchSpace, StudentConfig, load_space, preset
from search_spaces.serialization import CONFIG_NAME
from teacher import model_iters

from .recipe import RUN_STAND_INS, RunRecipe
from .records import WALL_TIME_RECORD
from .standin import SHIPPED_DIR
from .teacher_stage import TeacherInfo, get_teacher

PARENT_KEYWORDS = ("auto", "teacher", "largest")

RESUME_CHECKED = ("seed", "height", "width", "data.", "teacher.", "search.", "loss.", "optim.")
"""Recipe keys whose change would mix two runs' results in one directory: the search's trials and the labels they
were distilled on have no stage of their own that redoes them. Prune, distill and export settings may change on a
resume (those stages are redone when theirs differ), as may the wall-clock and reporting keys below."""

RESUME_FREE = ("teacher.trust_checkpoint", "search.n_trials", "search.timeout", "search.storage",
               "search.latency.report_rounds")
"""Keys under RESUME_CHECKED that change no result: more trials extend the study, a longer timeout lets it go on."""

RECIPE_RECORD = "recipe.yaml"

RUN_ENTRIES = (LOCK_NAME, RECIPE_RECORD, WALL_TIME_RECORD, "summary.json", "report_latency.json", "teacher", "labels",
               "parent", "trials", "search", "prune", "final", "export", "mlartifacts", RUN_RECORD)
"""What ffsc makes at the top of a run directory, besides the databases below: all that --start-over deletes."""
SQLITE_FILES = (DEFAULT_SQLITE_NAME, "mlflow.db", "latency_cache.sqlite", DEFAULT_JOURNAL_NAME)
"""ffsc's databases (the study, MLflow, the latency cache) and the study's journal file, each with its companions."""


def say(recipe: RunRecipe, message: str, force: bool = False) -> None:
    """One progress line (only with ``progress``, unless ``force``)."""
    if recipe.progress or force:
        print(f"[ffsc] {message}", flush=True)


def quiet_third_party() -> None:
    """Keep the console to ffsc's own progress: no per-trial Optuna lines, no tracer chatter on export."""
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


def teacher_folder(recipe: RunRecipe) -> Path | None:
    """The saved student folder of a stand-in teacher known before the run (None: official, or trained here)."""
    if recipe.teacher.checkpoint or recipe.teacher.stand_in == "train":
        return None
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


def search_space(recipe: RunRecipe, parent: Path | None) -> SearchSpace:
    """The space the search samples: the recipe's, laid over the trained parent when there is one."""
    if parent is None:
        return load_space(recipe.search.space)
    cfg = StudentConfig.from_yaml(parent / CONFIG_NAME)
    return load_space(recipe.search.space, parent=cfg, parent_name=f"parent {parent}")


def _check_named_folder(key: str, value: str, folder: Path, names: tuple[str, ...], meanings: str) -> None:
    """One line for a ``value`` that is neither one of ``names`` nor an existing folder, listing the names (with
    ``meanings``, one each) and the closest one."""
    if folder.exists():
        return
    raise ConfigError(f"{key}={value!r}: no such folder, and not one of {', '.join(map(repr, names))} "
                      f"({meanings}); expected one of those or a saved student folder{did_you_mean(value, names)}")


def preflight(recipe: RunRecipe) -> tuple[RunRecipe, BackendChoice]:
    """Check everything that can be checked before any work (nothing is written): the device, the latency
    backend ('auto' resolved), the teacher checkpoint, data folders and the run directory. Returns the recipe
    with its latency backend resolved, and the BackendChoice."""
    pick_device(recipe.device)  # a device this machine lacks is one line, here
    lat, choice = recipe.search.latency.resolved()
    pf.check_latency(lat, key="search.latency")
    if recipe.teacher.checkpoint:
        pf.check_checkpoint(recipe.teacher.checkpoint, key="teacher.checkpoint",
                            trust_pickle=recipe.teacher.trust_checkpoint)
    elif recipe.teacher.stand_in == "train":
        preset(recipe.teacher.train.preset, **recipe.teacher.train.overrides)  # unknown: lists the presets
    else:
        _check_named_folder("teacher.stand_in", recipe.teacher.stand_in, teacher_folder(recipe), RUN_STAND_INS,
                            "the shipped stand-in, one trained here")
        pf.check_checkpoint(teacher_folder(recipe), key="teacher.stand_in")
    pf.check_tracking_uri(recipe.tracking.uri)
    if recipe.search.enabled:
        pf.check_storage(recipe.search.storage, key="search.storage")
        parent = search_parent(recipe, teacher_folder(recipe))
        if parent is not None:
            if recipe.search.parent not in PARENT_KEYWORDS:
                _check_named_folder("search.parent", recipe.search.parent, parent, PARENT_KEYWORDS,
                                    "the teacher when it is of the student family, the teacher, the space's "
                                    "largest member distilled here")
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
    metric = recipe.search.error_metric
    if recipe.search.enabled and metric.startswith("gt/") and recipe.data.eval.path:
        spec = recipe.data.eval
        pf.check_ground_truth(spec.path, spec.kind, key="data.eval.path", options=spec.options,
                              why=f", and search.error_metric={metric} scores every trial against it; use "
                                  f"search.error_metric=teacher/{metric.removeprefix('gt/')}")
    if recipe.export.enabled and "engine" in recipe.export.formats:
        gpu_problem = None if torch.cuda.is_available() else "PyTorch sees no CUDA GPU"
        if problem := get_backend("tensorrt").available() or gpu_problem:
            raise MissingDependencyError(f"export.formats={recipe.export.formats}: a TensorRT engine cannot be built "
                                         f"here ({problem}); export 'onnx' only (export.formats=[onnx]) and build "
                                         "the engine on the target with `ffsc export`, or run on a CUDA machine with "
                                         "TensorRT")
        pf.check_tensorrt_precision(recipe.export.precision, "export.precision")
    pf.check_writable(recipe.run_dir or "runs", key="run_dir")
    if lat.mode == "predicted":
        table = open_table(lat)  # a damaged table file fails here, not after the labelling
        pf.check_writable(table.path, key="search.latency.table")
    search = dataclasses.replace(recipe.search, latency=lat)
    return dataclasses.replace(recipe, search=search), choice


def labels_config(recipe: RunRecipe) -> LabelCacheConfig:
    """The label cache's settings (what it stores; the teacher's iterations and the label size are passed apart)."""
    return recipe.data.labels


def teacher_iters(recipe: RunRecipe, teacher_model: torch.nn.Module) -> int:
    """The teacher's GRU iterations: those it labels with (the one count it is timed, counted and scored at)."""
    return model_iters(teacher_model, recipe.teacher.iters, key="teacher.iters")


def prepare_labels(recipe: RunRecipe, run_dir: Path, teacher: TeacherInfo, device: torch.device
                   ) -> tuple[Path, LabelledDataset]:
    """Label the training and held-out sets once with the teacher; returns (train cache dir, eval dataset)."""
    labels = labels_config(recipe)
    out = {}
    for split, spec in (("train", recipe.data.train), ("eval", recipe.data.eval)):
        dataset = build_dataset(spec, seed=recipe.seed + (0 if split == "train" else 1))
        root = run_dir / "labels" / split
        build_label_cache(teacher.model, dataset, root, labels, iters=recipe.teacher.iters, size=recipe.data.size,
                          identity=teacher.identity, device=device, progress=recipe.progress)
        out[split] = (root, dataset)
    eval_set = LabelledDataset(out["eval"][1], out["eval"][0], seed=recipe.seed)
    return out["train"][0], eval_set


def teacher_scores(eval_set: LabelledDataset) -> dict[str, float]:
    """The teacher's own accuracy on the held-out set (its cached disparity against ground truth)."""
    acc = MetricAccumulator()
    for i in range(len(eval_set)):
        item = eval_set[i]
        if bool(item.get("has_gt", False)):
            acc.update(item["teacher_disp"][None].float(), item["disp"][None], item["valid"][None])
    return {f"gt/{k}": v for k, v in acc.compute().items()} if acc.num_images else {}


def _foreign_entries(run_dir: Path) -> list[str]:
    """The names at the top of ``run_dir`` that ffsc does not make (sorted)."""
    return sorted(p.name for p in run_dir.iterdir() if not _ffsc_entry(p.name))


def _ffsc_entry(name: str) -> bool:
    # SQLite leaves companions beside a database (-wal, -shm, -journal); a journal storage, its lock file.
    return name in RUN_ENTRIES or name.startswith(SQLITE_FILES)


def check_start_over(run_dir: Path) -> None:
    """Refuse ``--start-over`` on a folder that holds something but is not an ffsc run directory (nothing is
    deleted or written): it deletes results, and a folder without a recorded recipe holds none of ffsc's."""
    if not run_dir.is_dir() or (run_dir / RECIPE_RECORD).is_file():
        return
    held = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_NAME)
    if held:
        shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        raise ConfigError(f"--start-over: {run_dir} is not an ffsc run directory (no {RECIPE_RECORD}; it holds "
                          f"{shown}), so nothing was deleted; point run_dir at a run directory, or at a new or empty "
                          "folder")


def claim_run_dir(recipe: RunRecipe, run_dir: Path, start_over: bool = False) -> None:
    """Before the first stage: refuse a resume whose recipe differs from the recorded one in a key that changes
    results, or, with ``start_over``, delete the run's results (what ffsc made; a folder that is not a run
    directory is refused). Writes nothing else: ``record_recipe`` records the recipe once the stages start."""
    record = run_dir / RECIPE_RECORD
    if start_over:
        check_start_over(run_dir)
        cleared = [p for p in run_dir.iterdir() if p.name != LOCK_NAME and _ffsc_entry(p.name)]
        for path in cleared:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        kept = _foreign_entries(run_dir)
        if cleared or kept:
            note = f"; kept what ffsc did not make: {', '.join(kept)}" if kept else ""
            say(recipe, f"run directory {run_dir}: starting over ({len(cleared)} earlier entries removed{note})",
                force=True)
    elif record.is_file():
        old = translate_renamed(RunRecipe, flatten_params(read_yaml(record, "recorded recipe")))
        new = flatten_params(to_plain(recipe))
        changed = [k for k in sorted(set(old) & set(new))  # a key only one side has: another ffsc version's
                   if old[k] != new[k] and k.startswith(RESUME_CHECKED) and not k.startswith(RESUME_FREE)]
        if changed:
            shown = ", ".join(f"{k}: {old[k]} -> {new[k]}" for k in changed[:4])
            raise ConfigError(
                f"run directory {run_dir} holds a run of another recipe ({shown}{' ...' if len(changed) > 4 else ''});"
                " resuming would mix the two. Use another run_dir, or add --start-over to delete its results and "
                "start again")
        say(recipe, f"resuming run directory {run_dir}: finished stages are reused, unfinished ones go on", force=True)


def record_recipe(recipe: RunRecipe, run_dir: Path) -> None:
    """Record the recipe in ``run_dir`` as its first stage starts (after ``claim_run_dir``), so that a call that
    fails before any work leaves an earlier run's record as it was."""
    dump_yaml(recipe, run_dir / RECIPE_RECORD)


@dataclass
class RunContext:
    """A recipe ready to run: checked ('auto' resolved, run_dir set), its directory made and its device chosen;
    after ``open_teacher``, also its teacher, labels and tracker."""

    recipe: RunRecipe
    run_dir: Path
    device: torch.device
    choice: BackendChoice
    teacher: TeacherInfo | None = None
    labels_dir: Path | None = None
    """The training set's label cache."""
    eval_set: LabelledDataset | None = None
    """The held-out set with the teacher's labels."""
    tracker: Tracker | None = None

    def say(self, message: str, force: bool = False) -> None:
        """One progress line (only with the recipe's ``progress``, unless ``force``)."""
        say(self.recipe, message, force)

    def open_teacher(self) -> RunContext:
        """Get the teacher, label the training and held-out sets once with it and open the MLflow tracker."""
        recipe = self.recipe
        self.teacher = get_teacher(recipe, self.run_dir, self.device)
        self.say(f"teacher: {self.teacher.description}")
        self.labels_dir, self.eval_set = prepare_labels(recipe, self.run_dir, self.teacher, self.device)
        self.tracker = Tracker(self.run_dir, tracking_uri=recipe.tracking.uri, experiment=recipe.tracking.experiment,
                               teacher=self.teacher.identity)
        return self


def prepare_run(recipe: RunRecipe) -> RunContext:
    """Check the recipe before anything is written, make its run directory and pick its device (seeded)."""
    quiet_third_party()
    recipe, choice = preflight(recipe)
    run_dir = resolve_run_dir(recipe)
    recipe = dataclasses.replace(recipe, run_dir=str(run_dir))
    device = pick_device(recipe.device)
    torch.manual_seed(recipe.seed)
    return RunContext(recipe=recipe, run_dir=run_dir, device=device, choice=choice)


def describe_teacher(ctx: RunContext) -> dict[str, Any]:
    """The teacher's row of the summary before latency: description, path, iterations and held-out scores."""
    teacher = ctx.teacher
    return {"description": teacher.description, "path": str(teacher.path) if teacher.path else None,
            "iters": teacher_iters(ctx.recipe, teacher.model), **teacher_scores(ctx.eval_set)}
