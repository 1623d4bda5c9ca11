"""The one optimisation loop: ``fit()`` runs the steps of every training in ffsc (distillation, pruning
recovery, the stand-in teacher); the caller passes in how a batch becomes a loss and what to do after a step."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.terminal import progress_bar

LossFn = Callable[[Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""A batch -> (total loss with gradients, named loss parts)."""
StepHook = Callable[[int, torch.Tensor, dict[str, torch.Tensor]], "dict[str, str] | None"]
"""Called after each step as hook(step, total.detach(), parts); a dict it returns goes on the progress bar."""


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision on ``device`` in ``dtype``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``batch`` with every tensor (also in nested dicts) moved to ``device``."""

    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(device, non_blocking=True)
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        return v

    return {k: move(v) for k, v in batch.items()}


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every global RNG state (torch, numpy, Python, and ``device``'s CUDA one), as tensors and plain values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def fit(params: Iterable[nn.Parameter], loss_fn: LossFn, batches: Iterable[Any], optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler, *, steps: int, start: int = 0, grad_clip: float | None = None,
        scaler: torch.amp.GradScaler | None = None, on_step: StepHook | None = None, desc: str = "training",
        progress: bool = False, leave: bool = True) -> int:
    """Optimise from step ``start`` to ``steps`` (or until ``batches`` runs out); returns the step reached.

    Each step: loss -> backward (scaled by ``scaler`` for fp16) -> clip the norm of ``params`` to ``grad_clip``
    -> optimizer and scheduler step. No batch is drawn past the last step, so a resumable data order stays exact.
    """
    params = list(params)
    scaler = scaler or torch.amp.GradScaler("cuda", enabled=False)
    step = start
    it = iter(batches)
    bar = progress_bar(total=steps, initial=start, desc=desc, disable=not progress, leave=leave)
    optimizer.zero_grad(set_to_none=True)
    try:
        while step < steps:
            batch = next(it, it)
            if batch is it:
                break
            total, parts = loss_fn(batch)
            scaler.scale(total).backward()
            if grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            bar.update(1)
            if on_step is not None and (postfix := on_step(step, total.detach(), parts)):
                bar.set_postfix(postfix)
    finally:
        bar.close()
        optimizer.zero_grad(set_to_none=True)
    return step
