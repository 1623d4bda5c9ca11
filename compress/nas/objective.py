"""The NAS objective: sample a student, get its latency, distil it briefly from cached labels, score it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from compress.distill import distill, evaluate_student
from compress.distill.config import (
    DatasetSpec,
    LabelCacheConfig,
    LossConfig,
    OptimConfig,
    StudentSpec,
    trial_config,
)
from compress.distill.trainer import CHECKPOINT_NAME
from compress.errors import ConfigError
from compress.latency import LatencyCache, LatencyConfig, measure
from compress.latency_predictor import predict_latency
from search_spaces import build_student, count_macs, load_student, save_student
from teacher import model_iters

from .inherit import inherit_student, order_by_importance, parent_config

OVER_BUDGET_ATTR = "over_budget"
"""User attribute of a trial timed over the latency budget and pruned before its distillation (with the reason)."""

PROXIES = ("distill", "inherit")
"""Trial proxies: a short distillation from random init, or from weights inherited from a parent student."""


def check_proxy(proxy: str, parent_steps: int, where: str = "TrialSettings") -> None:
    """One clear error for an unknown proxy or a parent without training."""
    if proxy not in PROXIES:
        raise ConfigError(f"{where}.proxy: got {proxy!r}, expected one of {', '.join(PROXIES)}")
    if proxy == "inherit" and parent_steps < 1:
        raise ConfigError(f"{where}.parent_steps: got {parent_steps}, expected >= 1 with proxy 'inherit'")


@dataclass
class TrialSettings:
    """Everything a trial needs besides the sampled architecture."""

    run_dir: Path
    train_data: DatasetSpec
    labels_dir: Path
    labels: LabelCacheConfig
    """The settings the label cache was made with (the trainer checks they match)."""
    eval_set: Dataset
    """Held-out LabelledDataset: items carry ground truth and the teacher's disparity."""
    height: int
    width: int
    distill_steps: int
    batch_size: int
    loss: LossConfig
    optim: OptimConfig
    latency: LatencyConfig
    """How latency is obtained; its height and width are the size timed."""
    error_metric: str = "teacher/epe"
    device: str = "cpu"
    seed: int = 0
    latency_table: Any = None
    """A compress.latency_predictor table when latency.mode is 'predicted'."""
    latency_scale: float = 1.0
    """Predicted mode: measured / predicted on the students checked at the start of the search."""
    proxy: str = "inherit"
    """'inherit': each trial starts from weights sliced from a parent (the space's largest member) distilled once
    per study for ``parent_steps`` and reordered by channel importance; 'distill': it distils a randomly
    initialised student."""
    parent_steps: int = 300
    budget_ms: float | None = None
    """A trial timed over this latency is not distilled (it cannot join the front): Optuna records it pruned."""
    crop_size: list[int] | None = None
    """Random training crop of the labelled pairs (None: whole pairs)."""
    parent: Path | None = None
    """A trained student of the family (a saved student folder) whose sub-networks the space holds: trials start
    from its weights, and it is not distilled. None: the space's largest member, distilled for ``parent_steps``."""
    progress: bool = False
    """Show the parent's distillation (a line before it, then a bar, or a line every 30 s in a log); trials stay
    quiet (the study's bar reports them)."""

    def __post_init__(self) -> None:
        check_proxy(self.proxy, self.parent_steps)


class StudentSearchObjective:
    """``objective(trial) -> metrics`` for :func:`compress.nas.study.run_study` over a SearchSpace."""

    def __init__(self, space, settings: TrialSettings) -> None:
        self.space = space
        self.s = settings

        self.latency_cache = LatencyCache(settings.run_dir / "latency_cache.sqlite")
        self._parent = None

    def _distill_config(self, run_dir: Path, spec: StudentSpec, iters: int, steps: int, **quiet_or_not: Any):
        s = self.s
        return trial_config(run_dir, spec, s.train_data, s.labels_dir, s.labels, iters, steps=steps,
                            batch_size=s.batch_size, loss=s.loss, optim=s.optim, seed=s.seed, device=s.device,
                            crop_size=s.crop_size, **quiet_or_not)

    def parent(self) -> torch.nn.Module:
        """The study's parent: the trained one named by the settings, or the space's largest member distilled once
        and reused from disk; its channels reordered by importance."""
        if self._parent is None:
            s = self.s
            folder = s.parent or s.run_dir / "parent" / "student"
            if s.parent is None and not (folder / "model.safetensors").is_file():
                cfg = parent_config(self.space)
                spec = StudentSpec(kind="search_space", config=cfg.to_dict())
                # The parent's distillation is the search's longest step (20000 steps in the GPU recipe): it says
                # so, shows its progress, and checkpoints every tenth of the way so a killed run resumes it.
                every = max(1, s.parent_steps // 10)
                if s.progress:
                    # print, not rich: a log line that rich would wrap inside the path
                    print(f"[ffsc] parent: distilling {cfg.name} (the space's largest member) for {s.parent_steps} "
                          f"steps, checkpointed every {every} step{'' if every == 1 else 's'} in "
                          f"{s.run_dir / 'parent'}", flush=True)
                folder = distill(self._distill_config(s.run_dir / "parent", spec, cfg.iters, s.parent_steps,
                                                      progress=s.progress, checkpoint_every=every)).student_path
            if s.parent is None:  # also when a run was killed between saving the parent and dropping its state
                drop_training_state(s.run_dir / "parent")
            # Ordered on the study's device (one forward per channel group) and kept on the CPU, where trials
            # slice it; the same seed gives the same order in every worker.
            parent = load_student(folder, device=self.s.device)
            order_by_importance(parent, seed=self.s.seed)
            self._parent = parent.to("cpu")
        return self._parent

    def latency_ms(self, model: torch.nn.Module, cfg) -> float:
        """Median latency of the whole model at the working size (measured or predicted)."""
        lat = self.s.latency
        if lat.mode == "predicted":
            raw = predict_latency(self.s.latency_table, cfg, lat.height, lat.width, iters=lat.iters)
            return raw * self.s.latency_scale

        iters = model_iters(model, lat.iters, key="search.latency.iters")
        stats = measure(model, lat.backend, lat.height, lat.width, iters=iters, device=lat.device,
                        cache=self.latency_cache, **lat.timing())
        return float(stats.median_ms)

    def __call__(self, trial) -> dict[str, float]:
        s = self.s
        cfg = self.space.sample(trial)
        trial.set_user_attr("student_config", cfg.to_dict())
        model = build_student(cfg).eval()
        cost = count_macs(model, s.height, s.width, iters=cfg.iters)
        latency = self.latency_ms(model, cfg)
        if s.budget_ms is not None and latency > s.budget_ms:
            import optuna

            reason = f"{latency:.1f} ms is over the budget of {s.budget_ms:.1f} ms: not distilled"
            trial.set_user_attr(OVER_BUDGET_ATTR, reason)  # a pruned trial that counts toward n_trials
            trial.set_user_attr("latency_ms", latency)
            raise optuna.TrialPruned(reason)
        trial_dir = s.run_dir / "trials" / f"{trial.number:04d}"
        try:
            result, scores = self._distil_and_score(trial, cfg, trial_dir)
        finally:
            # Finished or failed, a trial keeps no training state: a failed trial is never resumed (Optuna records
            # it FAIL; a dead worker's trial is retried under a new number, in a new folder).
            drop_training_state(trial_dir)
        metrics = {
            "epe": scores[s.error_metric],
            "latency_ms": latency,
            "gmacs": cost.gmacs,
            "mparams": cost.params / 1e6,
            **{k.replace("/", "_"): v for k, v in scores.items()},
            **{f"loss_{k}": float(v) for k, v in result.train_losses.items() if isinstance(v, (int, float))},
        }
        trial.set_user_attr("student_path", str(result.student_path))
        return metrics

    def _distil_and_score(self, trial, cfg, trial_dir: Path):
        """The trial's short distillation (from the parent's sliced weights with proxy 'inherit') and its scores."""
        s = self.s
        spec = StudentSpec(kind="search_space", config=cfg.to_dict())
        if s.proxy == "inherit":
            child, report = inherit_student(self.parent(), cfg, seed=s.seed)
            trial.set_user_attr("inherited_fraction", report.fraction_inherited())
            spec = StudentSpec(kind="search_space", model=str(save_student(child, trial_dir / "inherited")))
        result = distill(self._distill_config(trial_dir, spec, cfg.iters, s.distill_steps))
        student = load_student(result.student_path, device=s.device)
        return result, evaluate_student(student, s.eval_set, iters=cfg.iters, device=s.device)


def drop_training_state(run_dir: Path) -> None:
    """Delete what only an unfinished distillation needs (its optimiser checkpoint, the inherited start) once its
    student is saved: a finished trial keeps its weights once, so a 200-trial study fits on a disk."""
    (run_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "inherited", ignore_errors=True)
