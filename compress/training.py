"""The one training setup of ffsc (distillation, pruning recovery, the stand-in teacher): the optimiser config
(:class:`OptimConfig`, the ``optim`` section of every recipe that trains), the optimiser and schedule built from it
(:func:`build_optimizer`, :func:`build_scheduler`) and ``fit()``, the one optimisation loop; the caller passes in
how a batch becomes a loss and what to do after a step."""

from __future__ import annotations

import contextlib
import functools
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.checks import require_non_negative, require_positive
from compress.errors import ConfigError
from compress.terminal import progress_bar

SCHEDULES = ("cosine", "one_cycle")

LossFn = Callable[[Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""A batch -> (total loss with gradients, named loss parts)."""
StepHook = Callable[[int, torch.Tensor, dict[str, torch.Tensor]], "dict[str, str] | None"]
"""Called after each step as hook(step, total.detach(), parts); a dict it returns goes on the progress bar."""


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule: the ``optim`` section of every recipe section that trains."""

    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "cosine"
    """'cosine': linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr``; 'one_cycle':
    torch's OneCycleLR (warm-up over ``warmup_ratio`` of the steps from lr / 25, cosine decay to lr / 1e5, AdamW's
    first beta cycled between 0.85 and 0.95), which the stand-in teacher trains with."""
    warmup_steps: int = 100
    """'cosine' only."""
    min_lr_ratio: float = 0.0
    """'cosine' only."""
    warmup_ratio: float = 0.05
    """'one_cycle' only: the fraction of the steps spent warming up."""
    decay_all: bool = False
    """Decay every parameter; False exempts the one-dimensional ones (biases, norm weights), as is usual."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this; None = no clipping."""

    def __post_init__(self) -> None:
        require_positive("optim.lr", self.lr)
        require_non_negative("optim.weight_decay", self.weight_decay)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas: got {list(self.betas)}, expected two numbers in [0, 1)")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule: got {self.schedule!r}, expected one of {', '.join(SCHEDULES)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps: got {self.warmup_steps}, expected >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio: got {self.min_lr_ratio}, expected within [0, 1]")
        if not 0 < self.warmup_ratio < 1:
            raise ConfigError(f"optim.warmup_ratio: got {self.warmup_ratio}, expected a fraction between 0 and 1")
        require_positive("optim.grad_clip", self.grad_clip, allow_none=True)


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable ``params`` as ``cfg`` says (1-D parameters undecayed unless ``cfg.decay_all``)."""
    params = [p for p in params if p.requires_grad]
    betas = tuple(cfg.betas)
    if cfg.decay_all:
        return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """The 'cosine' schedule's multiple of the peak learning rate at ``step`` of ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule ``cfg`` names, over ``steps`` optimiser steps."""
    if cfg.schedule == "one_cycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=steps,
                                                   pct_start=cfg.warmup_ratio, anneal_strategy="cos")
    # A partial, not a lambda: checkpoints hold its (empty) state as they always have.
    factor = functools.partial(lr_factor, warmup=cfg.warmup_steps, total=steps, min_ratio=cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
