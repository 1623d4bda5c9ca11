"""The NAS objective: sample a student, get its latency, distil it briefly from cached labels, score it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from compress.distill.config import (
    DatasetSpec,
    LabelCacheConfig,
    LossConfig,
    OptimConfig,
    StudentSpec,
    from_label_cache,
)
from compress.latency import LatencyConfig


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


class StudentSearchObjective:
    """``objective(trial) -> metrics`` for :func:`compress.nas.study.run_study` over a SearchSpace."""

    def __init__(self, space, settings: TrialSettings) -> None:
        self.space = space
        self.s = settings
        from compress.latency import LatencyCache

        self.latency_cache = LatencyCache(settings.run_dir / "latency_cache.sqlite")

    def latency_ms(self, model: torch.nn.Module, cfg) -> float:
        """Median latency of the whole model at the working size (measured or predicted)."""
        lat = self.s.latency
        if lat.mode == "predicted":
            from compress.latency_predictor import predict_latency

            raw = predict_latency(self.s.latency_table, cfg, lat.height, lat.width, iters=lat.iters)
            return raw * self.s.latency_scale
        from compress.latency import measure

        stats = measure(model, lat.backend, lat.height, lat.width, iters=lat.iters or cfg.iters, device=lat.device,
                        cache=self.latency_cache, **lat.timing())
        return float(stats.median_ms)

    def __call__(self, trial) -> dict[str, float]:
        from compress.distill import distill, evaluate_student
        from search_spaces import build_student, count_macs, load_student

        s = self.s
        cfg = self.space.sample(trial)
        trial.set_user_attr("student_config", cfg.to_dict())
        model = build_student(cfg).eval()
        cost = count_macs(model, s.height, s.width, iters=cfg.iters)
        latency = self.latency_ms(model, cfg)
        trial_dir = s.run_dir / "trials" / f"{trial.number:04d}"
        dc = from_label_cache(
            trial_dir, StudentSpec(kind="search_space", config=cfg.to_dict()), s.train_data, s.labels_dir, s.labels,
            cfg.iters, seed=s.seed, steps=s.distill_steps, batch_size=s.batch_size, amp="off", device=s.device,
            log_every=max(1, s.distill_steps // 4), checkpoint_every=s.distill_steps, progress=False, loss=s.loss,
            optim=dataclasses.replace(s.optim, warmup_steps=min(s.optim.warmup_steps, s.distill_steps // 4)),
        )
        result = distill(dc)
        student = load_student(result.student_path, device=s.device)
        scores = evaluate_student(student, s.eval_set, iters=cfg.iters, device=s.device)
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
