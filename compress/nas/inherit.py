"""Weight inheritance for the search's proxy: a candidate starts from a parent trained once per study.

The parent is the space's largest member (:func:`parent_config`). A candidate of the same space is built
from its own config and takes, for every tensor whose name it shares with the parent, the parent's leading
block (:func:`search_spaces.pretrained.slice_leading`): narrower layers keep the parent's first channels,
shallower stages its first blocks and its last one (EdgeNeXt's attention block,
:func:`search_spaces.pretrained.block_sources`). The same leading-channel rule applies to a layer's outputs and to the
next layer's inputs, so a chain of sliced layers computes the parent's computation restricted to the kept
channels; where a candidate's width equals the parent's, the layer is the parent's layer exactly. Tensors
the parent lacks, or where the candidate is wider (a choice that is not monotone, such as a coarser cost
volume's feature head), keep the candidate's fresh initialisation, and the report counts them.

:func:`order_by_importance` first reorders the parent's coupled channels by importance (a permutation that
leaves its output unchanged, found with the pruning stage's dependency graph), so that the leading channels
a candidate keeps are the important ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from compress.prune.coupling import analyze
from compress.prune.importance import group_scores
from compress.prune.trace import is_op
from search_spaces import SearchSpace, StudentConfig, StudentStereo, build_student
from search_spaces.pretrained import block_sources, slice_leading

# Searched fields whose smaller value is the larger network.
_SMALLER_IS_LARGER = ("volume_scale",)


@dataclass
class InheritReport:
    """What a candidate took from its parent, tensor by tensor."""

    exact: list[str] = field(default_factory=list)
    """Tensors copied whole (same shape as the parent's)."""
    sliced: list[str] = field(default_factory=list)
    """Tensors that took the parent's leading block."""
    fresh: list[str] = field(default_factory=list)
    """Tensors left at initialisation (not in the parent, or wider than it)."""

    def fraction_inherited(self) -> float:
        """Share of the candidate's tensors that came from the parent."""
        total = len(self.exact) + len(self.sliced) + len(self.fresh)
        return (len(self.exact) + len(self.sliced)) / max(1, total)


def _size(value) -> float:
    return float(sum(value)) if isinstance(value, list | tuple) else float(value)


def parent_config(space: SearchSpace) -> StudentConfig:
    """The space's largest member: every searched dimension at its largest choice (finest cost volume)."""
    values = {}
    for dim in space.dimensions:
        choices = dim.values()
        pick = min if dim.name in _SMALLER_IS_LARGER else max
        values[dim.name] = pick(choices, key=_size)
    return space.config_from_values(values).replace(name=f"{space.name}-parent")


def inherit_state(parent_state: dict[str, torch.Tensor], child_state: dict[str, torch.Tensor],
                  ) -> tuple[dict[str, torch.Tensor], InheritReport]:
    """The child's state dict filled from the parent's by leading-block slicing."""
    report = InheritReport()
    out = {}
    sources = block_sources(child_state, parent_state)
    for key, target in child_state.items():
        src = parent_state.get(sources[key])
        if src is not None and src.shape == target.shape:
            out[key] = src.detach().clone().to(target.dtype)
            report.exact.append(key)
            continue
        part = slice_leading(src.detach(), target.shape, key) if src is not None else None
        if part is None:
            out[key] = target
            report.fresh.append(key)
        else:
            out[key] = part.to(target.dtype)
            report.sliced.append(key)
    return out, report


def inherit_student(parent: nn.Module, cfg: StudentConfig, seed: int = 0) -> tuple[StudentStereo, InheritReport]:
    """The student ``cfg`` describes, with weights sliced from ``parent`` (a trained larger member of its space)."""
    # Weights the parent cannot supply come from a generator seeded here, not from whatever the process drew
    # before: a trial retried after a kill then starts from the same weights as the first try.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        child = build_student(cfg, pretrained=False)
    state, report = inherit_state(parent.state_dict(), child.state_dict())
    child.load_state_dict(state, strict=True)
    return child, report


# ------------------------------------------------------------------------------------ importance order

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_DECONV = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


def _tensor_dims(target, side: str, pruning_dim: int) -> list[tuple[str, int]] | None:
    """(tensor attribute, dimension) pairs that carry ``side``'s channels of ``target`` (None: not known here)."""
    if isinstance(target, nn.Parameter):
        return [("", pruning_dim)]
    if isinstance(target, _CONV):
        if side == "out":
            return [("weight", 0), ("bias", 0)]
        return [] if target.groups > 1 else [("weight", 1)]  # depthwise: the output side moves it
    if isinstance(target, _DECONV):
        return [("weight", 1), ("bias", 0)] if side == "out" else [("weight", 0)]
    if isinstance(target, nn.Linear):
        return [("weight", 0), ("bias", 0)] if side == "out" else [("weight", 1)]
    if isinstance(target, _NORMS):
        return [("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0)]
    return None


def _permute_group(coupling, gid: int, order: list[int]) -> bool:
    """Move root channel ``order[k]`` to position ``k`` in every layer of the group; False if a layer is unknown."""

    natural = coupling.tp_group(gid, list(range(len(order))))._group
    moved = coupling.tp_group(gid, order)._group
    if len(natural) != len(moved):
        return False
    done = set()
    for a, b in zip(natural, moved, strict=True):
        if is_op(a.dep.target):
            continue
        if a.dep.target is not b.dep.target or len(a.idxs) != len(b.idxs):
            return False
        side = "out" if a.dep.handler.__name__ == "prune_out_channels" else "in"
        key = (id(a.dep.target), side, tuple(a.idxs))
        if key in done:
            continue
        done.add(key)
        dims = _tensor_dims(a.dep.target.module, side, a.dep.target.pruning_dim)
        if dims is None:
            return False
        dst, src = torch.as_tensor(list(a.idxs)), torch.as_tensor(list(b.idxs))
        for attr, dim in dims:
            t = a.dep.target.module if attr == "" else getattr(a.dep.target.module, attr, None)
            if t is None:
                continue
            with torch.no_grad():
                t.index_copy_(dim, dst, t.index_select(dim, src).clone())
    return True


CHECK_SIZE = (64, 128)
"""The pair size that checks a permutation: a reordering that keeps the output at one size keeps it at every size
(the weights are permuted, not changed), so the working size (480x640: ~35 min on 2 CPU cores) is not needed."""


def order_by_importance(parent: StudentStereo, height: int = CHECK_SIZE[0], width: int = CHECK_SIZE[1], seed: int = 0,
                        ) -> dict[str, int]:
    """Reorder ``parent``'s channels, most important first, without changing what it computes.

    Groups of coupled channels come from the pruning stage's dependency graph (:mod:`compress.prune.coupling`)
    and are ranked by torch-pruning's magnitude importance; each group's permutation is kept only if the
    parent's output on a fixed pair is unchanged (a group through a layer this function cannot permute, or
    through a channel-mixing computation, is left in its order). Leading-channel slicing then keeps the
    important channels. Returns counts of groups reordered, left alone, and already in order.
    """

    parent.eval()
    coupling = analyze(parent)
    groups = [g for g in coupling.groups if g.prunable and g.unit == "channel" and g.size > 1]
    scores = group_scores(coupling, groups, "magnitude")
    gen = torch.Generator().manual_seed(seed)
    device = next(parent.parameters()).device
    left, right = (torch.rand(1, 3, height, width, generator=gen).to(device) * 255 for _ in range(2))
    with torch.no_grad():  # one GRU iteration runs every layer once: enough to check a permutation, and cheaper
        ref = parent(left, right, iters=1, test_mode=True)
    tol = 1e-4 * max(1.0, float(ref.abs().max()))
    counts = {"reordered": 0, "kept": 0, "in_order": 0}
    for group in groups:
        order = torch.argsort(scores[group.id], descending=True, stable=True).tolist()
        if order == sorted(order):
            counts["in_order"] += 1
            continue
        snapshot = {k: v.clone() for k, v in parent.state_dict().items()}
        ok = _permute_group(coupling, group.id, order)
        if ok:
            with torch.no_grad():
                ok = bool((parent(left, right, iters=1, test_mode=True) - ref).abs().max() <= tol)
        if not ok:
            parent.load_state_dict(snapshot)
        counts["reordered" if ok else "kept"] += 1
    return counts
