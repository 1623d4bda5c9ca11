"""Evaluate a stereo model on a dataset: EPE, D1 and bad-pixel rates against ground truth and the teacher."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from compress.metrics import MetricAccumulator
from compress.terminal import progress_bar
from compress.training import autocast
from teacher.inference import InputPadder, infer
from teacher.outputs import StereoOutput


@torch.no_grad()
def evaluate_student(
    model: nn.Module,
    dataset: Dataset,
    *,
    iters: int,
    device: str | torch.device = "cpu",
    teacher: nn.Module | None = None,
    teacher_iters: int | None = None,
    teacher_disps: list[torch.Tensor] | None = None,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """EPE/D1/bad-pixel of the student against ground truth ('gt/...') and against the teacher ('teacher/...').

    The teacher's disparity comes from each item's ``teacher_disp`` (a LabelledDataset), from
    ``teacher_disps`` (one per item), or from running ``teacher``; without any, only 'gt/' metrics appear.
    Images of any size are padded to multiples of 32. The model's train/eval mode is restored afterwards.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    gt_acc, t_acc = MetricAccumulator(), MetricAccumulator()
    try:
        for i in progress_bar(range(len(dataset)), desc="evaluating", disable=not progress, leave=False):
            item = dataset[i]
            left = item["left"][None].to(device)
            right = item["right"][None].to(device)
            padder = InputPadder(*left.shape[-2:])
            with autocast(device, amp_dtype):
                out = model(*padder(left, right), iters=iters, test_mode=True)
            pred = padder.unpad(out.disp if isinstance(out, StereoOutput) else out).float().cpu()
            if bool(item.get("has_gt", False)):
                gt_acc.update(pred, item["disp"][None], item["valid"][None])
            t_disp = None
            if "teacher_disp" in item:
                t_disp = item["teacher_disp"][None]
            elif teacher_disps is not None:
                t_disp = teacher_disps[i]
            elif teacher is not None:
                t_disp = infer(teacher, left, right, iters=teacher_iters).cpu()
            if t_disp is not None:
                t_acc.update(pred, t_disp.float())
    finally:
        model.train(was_training)
    out: dict[str, float] = {}
    if gt_acc.num_images and gt_acc.num_pixels:
        out.update({f"gt/{k}": v for k, v in gt_acc.compute().items()})
    if t_acc.num_images:
        out.update({f"teacher/{k}": v for k, v in t_acc.compute().items()})
    return out
