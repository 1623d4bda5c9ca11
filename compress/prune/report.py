"""The record of a pruning run: its steps, ``prune_result.json``, the event log and its callbacks."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.errors import CheckpointError

Callback = Callable[[str, int, dict[str, float]], None]
"""Called as callback(kind, step, metrics); kind is 'baseline', 'step', 'recovery' or 'end'."""

RESULT_NAME = "prune_result.json"
LOG_NAME = "log.jsonl"
MODEL_DIR = "model"


@dataclass
class StepRecord:
    """One pruning step."""

    step: int
    keep_fraction: float
    groups_changed: int
    gmacs: float
    mparams: float
    latency_ms: float | None
    distill_loss: float | None
    seconds: float
    widths: dict[str, list[int]] = field(default_factory=dict)
    """Group root -> [width before, width after] for the groups this step changed."""


@dataclass
class PruneResult:
    """What ``prune_to_budget`` produced; ``to_dict`` is what ``prune_result.json`` holds."""

    budget_kind: str
    budget_value: float
    met: bool
    initial: dict[str, Any]
    final: dict[str, Any]
    steps: list[StepRecord]
    recovery: dict[str, Any]
    evaluation: dict[str, Any]
    config: dict[str, Any]
    model_path: str | None = None
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def measurement(self) -> dict[str, Any] | None:
        """How the final latency was measured (backend, device, shapes, precision, iters, stats), if it was."""
        return self.final.get("latency")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (without the model)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        data["steps"] = [asdict(s) for s in self.steps]
        data["measurement"] = self.measurement
        return copy.deepcopy(data)


def log_event(out: Path | None, callbacks: list[Callback], kind: str, step: int, metrics: dict[str, Any]) -> None:
    """Append an event to ``out``'s log (when there is one) and hand its numeric metrics to every callback."""
    if out is not None:
        with (out / LOG_NAME).open("a") as f:
            f.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **metrics}, default=str) + "\n")
    flat = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for cb in callbacks:
        cb(kind, step, flat)


def tracker_callback(tracker: Any, prefix: str = "prune") -> Callback:
    """A callback that logs every event's metrics to a ``compress.tracking.Tracker`` (MLflow)."""

    def callback(kind: str, step: int, metrics: dict[str, float]) -> None:
        tracker.log_metrics({f"{prefix}/{kind}/{k}": v for k, v in metrics.items()}, step=step)

    return callback


def check_reload(model: nn.Module, reloaded: nn.Module, device: torch.device) -> None:
    """Raise unless ``reloaded`` computes exactly what ``model`` computes (the saved widths are complete)."""
    gen = torch.Generator().manual_seed(0)
    left = (255 * torch.rand(1, 3, 64, 128, generator=gen)).to(device)
    right = torch.roll(left, -2, dims=-1)
    with torch.no_grad():
        a = model(left, right, iters=2, test_mode=True)
        b = reloaded(left, right, iters=2, test_mode=True)
    if not torch.equal(a, b):
        raise CheckpointError(f"the saved model does not reproduce the pruned one (max |diff| "
                              f"{float((a - b).abs().max()):.3g}); its recorded widths are incomplete")


def flatten_metrics(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The scalars of a nested dict, keyed by their slash-joined paths."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_metrics(v, key + "/"))
        elif isinstance(v, (int, float, bool)) or v is None:
            out[key] = v
    return out
