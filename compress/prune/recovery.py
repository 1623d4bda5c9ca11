"""Recovery: distillation against the teacher between pruning steps and after the last one, and its scores.

The built-in trainer (:class:`Distiller`) runs ``compress.training.fit`` on the pruning samples; a distill
recipe (``distill.recipe``) runs the full ``compress.distill`` trainer instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.distill import DistillLoss, GroundTruth, LossConfig, TeacherTargets, distill, load_recipe
from compress.distill.config import FeatureLossConfig, OutputLossConfig
from compress.errors import ConfigError, FFSCError
from compress.evaluation import evaluate_student
from compress.models import resolve_model
from compress.terminal import progress_bar
from compress.training import OptimConfig, build_optimizer, build_scheduler, fit
from search_spaces import StudentStereo
from search_spaces.serialization import save_model

from .config import PruneConfig
from .samples import collate, index_batches


class Distiller:
    """Teacher targets computed once per sample, and the distillation loss of ``compress.distill``.

    The feature loss is off (pruned widths differ from the teacher's; an adapter would have to be learned);
    the cost-volume KL and the sequence loss to the teacher's disparity drive both Taylor importance and the
    recovery. Ground truth, where a sample has it, joins with weight ``gt_weight`` (0 by default: recovery
    restores what the pruned model lost against its teacher; a ground-truth term pulls elsewhere). The term
    pulling the initial (cost-volume) disparity towards the teacher's final one has weight ``init_weight``
    (0 by default: the cost-volume KL already supervises that branch, and the pull would move an unpruned
    cost volume away from what the refinement was trained on).
    """

    def __init__(self, teacher: nn.Module, samples: list[dict], device: torch.device, teacher_iters: int,
                 train_iters: int, progress: bool = False, gt_weight: float = 0.0, init_weight: float = 0.0) -> None:
        self.samples = samples
        self.device = device
        self.train_iters = train_iters
        output = OutputLossConfig(gt_weight=gt_weight, init_weight=init_weight)
        loss_cfg = LossConfig(feature=FeatureLossConfig(enabled=False), output=output)
        self.loss = DistillLoss(loss_cfg).to(device)
        self.targets = []
        teacher.eval()
        with torch.no_grad():
            for s in progress_bar(samples, desc="teacher targets", disable=not progress, leave=False):
                out = teacher(s["left"][None].to(device), s["right"][None].to(device), iters=teacher_iters,
                              test_mode=True, return_intermediates=True)
                self.targets.append(TeacherTargets.from_output(out, feature_levels=[]).to("cpu"))

    def targets_for(self, idxs: list[int]) -> TeacherTargets:
        """The batched teacher targets of samples ``idxs`` on the device."""
        ts = [self.targets[i] for i in idxs]
        prob = None if ts[0].prob is None else torch.cat([t.prob for t in ts])
        return TeacherTargets(disp=torch.cat([t.disp for t in ts]), prob=prob, prob_scale=ts[0].prob_scale).to(
            self.device
        )

    def loss_of(self, model: nn.Module, idxs: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Distillation loss of ``model`` on samples ``idxs`` (with gradients)."""
        batch = collate(self.samples, idxs, self.device)
        out = model(batch["left"], batch["right"], iters=self.train_iters, test_mode=False,
                    return_intermediates=True)
        return self.loss(out, self.targets_for(idxs), GroundTruth.from_batch(batch))

    def train(self, model: nn.Module, steps: int, optim: OptimConfig, batch_size: int = 1,
              freeze_norm_stats: bool = True, desc: str = "distilling", progress: bool = False) -> float:
        """``steps`` optimiser steps as ``optim`` says; returns the mean loss of the last quarter of the steps."""
        if steps <= 0:
            return float("nan")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the model has no trainable parameters to distil")
        opt = build_optimizer(params, optim)
        sched = build_scheduler(opt, optim, steps)
        was_training = model.training
        model.train()
        if freeze_norm_stats:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        tail: list[float] = []

        def loss_of(batch: tuple[int, list[int]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            i, idxs = batch
            total, parts = self.loss_of(model, idxs)
            if not torch.isfinite(total):
                raise FFSCError(f"the distillation loss became {float(total.detach())} at step {i}; "
                               "lower distill.optim.lr")
            return total, parts

        def after_step(step: int, total: torch.Tensor, parts: dict[str, torch.Tensor]) -> dict[str, str]:
            if step > steps - max(1, steps // 4):
                tail.append(float(total))
            return {"loss": f"{float(total):.4g}"}

        try:
            fit(params, loss_of, enumerate(index_batches(self.samples, batch_size, 0, steps)), opt, sched,
                steps=steps, grad_clip=optim.grad_clip, on_step=after_step, desc=desc, progress=progress, leave=False)
        finally:
            model.train(was_training)
        return sum(tail) / len(tail)


def evaluate_on_targets(model: nn.Module, distiller: Distiller, n: int, iters: int,
                        device: torch.device) -> dict[str, float]:
    """Scores of ``model`` on the first ``n`` samples against the teacher's disparities (and ground truth)."""
    n = min(n, len(distiller.samples))
    if n == 0:
        return {}
    disps = [t.disp for t in distiller.targets[:n]]
    return evaluate_student(model, distiller.samples[:n], iters=iters, device=device, teacher_disps=disps)


def recover_with_recipe(model: nn.Module, cfg: PruneConfig, out: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Recover ``model`` with the ``compress.distill`` trainer and ``cfg.distill.recipe``; returns it and a record."""
    start = save_model(model, out / "recovery_start")
    kind = "search_space" if isinstance(model, StudentStereo) else "foundation_stereo"  # a pruned teacher
    student = [f"student.kind={kind}", "student.preset=null", "student.config={}", "student.factory=null",
               f"student.model={start}"]
    overrides = [*student, f"run_dir={out / 'recovery'}", f"steps={cfg.distill.recovery_steps}",
                 f"progress={str(cfg.progress).lower()}", *cfg.distill.recipe_overrides]
    result = distill(load_recipe(cfg.distill.recipe, overrides))
    recovered = resolve_model(result.student_path).module.to(next(model.parameters()).device)
    return recovered, {"recipe": cfg.distill.recipe, "run_dir": str(result.run_dir),
                       "train_losses": result.train_losses, "eval": result.eval_metrics}
