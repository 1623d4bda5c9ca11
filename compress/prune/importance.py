"""Channel importance per coupled group: magnitude, first-order Taylor of the distillation loss, or random.

Scores come from torch-pruning's importance estimators applied to each group's torch-pruning ``Group``, so a
channel's score sums over every layer it appears in (its producers' output filters, its consumers' input
slices, norms, layer scales). Each group's scores are divided by their mean so groups of different layers can
be ranked together (global ranking).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch_pruning as tp
from torch import nn

from compress.errors import ConfigError

from .coupling import ChannelGroup, Coupling, correlation_split, keep_multiple

METHODS = ("taylor", "magnitude", "random")


def make_importance(method: str) -> tp.importance.Importance:
    """The torch-pruning estimator for ``method`` (mean over a group's layers, normalised by the group mean)."""
    if method == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="mean")
    if method == "taylor":
        return tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer="mean")
    if method == "random":
        return tp.importance.RandomImportance()
    raise ConfigError(f"importance {method!r} is unknown; expected one of {', '.join(METHODS)}")


def accumulate_gradients(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor],
    batches: Iterable[dict],
    frozen: tuple[str, ...] = (),
) -> int:
    """Sum the gradients of ``loss_fn(model, batch)`` over ``batches`` into ``.grad`` (the Taylor statistics).

    Runs in eval mode (normalisation statistics stay put). Parameters outside ``frozen`` prefixes take part
    even when the model was loaded frozen; their previous requires_grad flags are restored. Returns the
    number of batches.
    """
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(not any(name == f or name.startswith(f + ".") for f in frozen))
        p.grad = None
    model.eval()
    count = 0
    try:
        with torch.enable_grad():
            for batch in batches:
                loss_fn(model, batch).backward()
                count += 1
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    if count == 0:
        raise ConfigError("Taylor importance needs at least one calibration batch; got none")
    return count


def _ensure_grads(group) -> None:
    # A layer the loss does not reach (e.g. an unused head) has no gradient; its Taylor score is then zero.
    for dep, _ in group:
        module = dep.target.module
        for p in (module,) if isinstance(module, nn.Parameter) else module.parameters(recurse=False):
            if p.grad is None:
                p.grad = torch.zeros_like(p)


def group_scores(
    coupling: Coupling, groups: Iterable[ChannelGroup], method: str, seed: int = 0
) -> dict[int, torch.Tensor]:
    """Per-channel importance (root numbering, float32 on the CPU) of every group in ``groups``."""
    estimator = make_importance(method)
    scores: dict[int, torch.Tensor] = {}
    for group in groups:
        if method == "random":  # seeded per group (the library's estimator draws from the global generator)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + group.id)
            imp = torch.rand(group.size, generator=gen)
        else:
            tp_group = coupling.tp_group(group.id)
            if method == "taylor":
                _ensure_grads(tp_group)
            imp = estimator(tp_group)
        if imp is None:  # no weighted layer in the group: nothing to rank by, keep the order
            imp = torch.ones(group.size)
        imp = imp.detach().float().cpu()
        if imp.numel() != group.size:
            raise ConfigError(
                f"importance of group {group.root} has {imp.numel()} entries for {group.size} channels; "
                "the coupling is inconsistent"
            )
        scores[group.id] = torch.nan_to_num(imp, nan=0.0)
    return scores


# ------------------------------------------------------------------------------------------ selection


def _round_keep(target: float, multiple: int, low: int, high: int) -> int:
    """``target`` rounded to the nearest multiple of ``multiple``, within [low, high]."""
    keep = int(round(target / multiple)) * multiple
    return max(low, min(high, keep))


def keep_bounds(group: ChannelGroup, original: int, round_to: int, max_ratio: float) -> tuple[int, int]:
    """(granularity, smallest allowed kept width) of a group whose unpruned width was ``original``."""
    multiple = keep_multiple(group, round_to)
    low = max(multiple, -(-int(original * (1 - max_ratio)) // multiple) * multiple)
    return multiple, low


def _choose(group: ChannelGroup, scores: torch.Tensor, keep: int) -> list[int]:
    """Indices of the ``group.size - keep`` least important channels, removed in the group's units."""
    n = group.size
    if keep >= n:
        return []
    if group.unit == "head":
        per_head = scores.view(-1, group.unit_size).mean(dim=1)
        drop = torch.argsort(per_head)[: (n - keep) // group.unit_size]
        return sorted(int(h) * group.unit_size + j for h in drop for j in range(group.unit_size))
    if group.unit == "correlation":
        per = (n - keep) // group.num_groups
        out = []
        for span in correlation_split(n, group.num_groups):
            local = scores[span.start : span.stop]
            out.extend(span.start + int(i) for i in torch.argsort(local)[:per])
        return sorted(out)
    return sorted(int(i) for i in torch.argsort(scores)[: n - keep])


def plan_removals(
    groups: list[ChannelGroup],
    scores: dict[int, torch.Tensor],
    keep_fraction: float,
    round_to: int = 8,
    global_ranking: bool = True,
    original: dict[int, int] | None = None,
    max_ratio: float = 0.9,
) -> dict[int, list[int]]:
    """Channels to remove so every group keeps about ``keep_fraction`` of its original width.

    Per-group ranking keeps ``keep_fraction`` of each group; global ranking keeps that fraction of all
    channels together, removing the lowest (group-normalised) scores wherever they are. Kept widths are then
    rounded to each group's granularity (``round_to``; whole heads; equal correlation groups), never below
    ``1 - max_ratio`` of the original width, never above the current width.
    """
    original = original or {}
    bounds = {g.id: keep_bounds(g, original.get(g.id, g.size), round_to, max_ratio) for g in groups}
    groups = [g for g in groups if g.size > bounds[g.id][1]]  # already at their smallest allowed width
    if global_ranking:
        total = sum(original.get(g.id, g.size) for g in groups)
        pool = torch.cat([scores[g.id] for g in groups]) if groups else torch.empty(0)
        n_remove = min(pool.numel(), max(0, int(pool.numel() - round(total * keep_fraction))))
        threshold = torch.sort(pool).values[n_remove - 1] if n_remove else None
        targets = {g.id: g.size - (int((scores[g.id] <= threshold).sum()) if n_remove else 0) for g in groups}
    else:
        targets = {g.id: original.get(g.id, g.size) * keep_fraction for g in groups}
    plan: dict[int, list[int]] = {}
    for g in groups:
        multiple, low = bounds[g.id]
        idxs = _choose(g, scores[g.id], _round_keep(targets[g.id], multiple, low, g.size))
        if idxs:
            plan[g.id] = idxs
    return plan
