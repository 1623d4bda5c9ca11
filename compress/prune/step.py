"""One pruning step: trace the model, rank its in-scope channel groups and cut them to a kept fraction."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from compress.errors import ConfigError
from compress.pruning_rules import FamilyRules

from .cost import LayerCosts
from .coupling import analyze, apply_plan, rules_for
from .importance import accumulate_gradients, group_scores, plan_removals


def check_scope(rules: FamilyRules, scope: Iterable[str]) -> None:
    """Raise unless every part of ``scope`` is one the model's family declares."""
    missing = [p for p in scope if p not in rules.parts]
    if missing:
        raise ConfigError(
            f"scope {', '.join(missing)} cannot be pruned on a {rules.family}; its prunable parts are "
            f"{', '.join(rules.parts)}"
        )


def prune_step(
    model: nn.Module,
    keep_fraction: float,
    scope: Iterable[str],
    importance: str = "magnitude",
    round_to: int = 8,
    global_ranking: bool = True,
    max_ratio: float = 0.9,
    original: dict[str, int] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    batches: Iterable[Any] = (),
    trace_size: tuple[int, int] = (32, 64),
    seed: int = 0,
    target: tuple[str, float, LayerCosts] | None = None,
) -> tuple[dict[str, tuple[int, int]], float]:
    """Prune ``model`` in place so in-scope groups keep about ``keep_fraction`` of their ``original`` widths.

    ``original`` maps group roots to unpruned widths (filled on the first call, so pass the same dict to
    every step); Taylor importance needs ``loss_fn(model, batch)`` and calibration ``batches``. With
    ``target = ("macs" | "params", value, layer costs)`` the kept fraction is instead the largest one, at most
    ``keep_fraction``, whose predicted cost is within ``value``. Returns ``({group root: (width before, width
    after)} for the groups that changed, the kept fraction used)``.
    """
    scope = list(scope)
    rules = rules_for(model)
    check_scope(rules, scope)
    coupling = analyze(model, rules, height=trace_size[0], width=trace_size[1])
    groups = coupling.prunable(scope)
    original = original if original is not None else {}
    for g in groups:
        original.setdefault(g.root, g.size)
    if importance == "taylor":
        if loss_fn is None:
            raise ConfigError("Taylor importance needs a loss (the distillation loss) and calibration batches")
        accumulate_gradients(model, loss_fn, batches, frozen=coupling.rules.frozen)
    scores = group_scores(coupling, groups, importance, seed=seed)
    widths = {g.id: original[g.root] for g in groups}

    def plan_for(fraction: float) -> dict[int, list[int]]:
        return plan_removals(groups, scores, fraction, round_to=round_to, global_ranking=global_ranking,
                             original=widths, max_ratio=max_ratio)

    fraction = keep_fraction
    plan = plan_for(fraction)
    if target is not None:
        kind, value, costs = target
        which = 0 if kind == "macs" else 1
        lo, hi = 1 - max_ratio, keep_fraction
        if costs.predict(coupling, plan)[which] > value:
            fraction, plan = lo, plan_for(lo)
            for _ in range(14):  # bisection: the largest fraction whose predicted cost fits
                mid = (lo + hi) / 2
                trial = plan_for(mid)
                if costs.predict(coupling, trial)[which] <= value:
                    lo, fraction, plan = mid, mid, trial
                else:
                    hi = mid
    apply_plan(coupling, plan)
    for p in model.parameters():
        p.grad = None
    changed = {coupling.groups[gid].root: (coupling.groups[gid].size, coupling.groups[gid].size - len(idxs))
               for gid, idxs in plan.items()}
    return changed, fraction


def prune_once(model: nn.Module, ratio: float, scope: Iterable[str], importance: str = "magnitude",
               round_to: int = 8, global_ranking: bool = False, **kwargs: Any) -> dict[str, tuple[int, int]]:
    """Remove about ``ratio`` of every in-scope group's channels in one step (see :func:`prune_step`)."""
    if not 0 < ratio < 1:
        raise ConfigError(f"ratio: got {ratio}, expected a fraction between 0 and 1")
    changed, _ = prune_step(model, 1 - ratio, scope, importance=importance, round_to=round_to,
                            global_ranking=global_ranking, max_ratio=max(ratio, kwargs.pop("max_ratio", 0.9)),
                            **kwargs)
    return changed
