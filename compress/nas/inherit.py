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

Channels are kept in the parent's stored order; reordering the parent by importance first (a permutation
that leaves its function unchanged) would make the kept channels the important ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

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


def inherit_student(parent: nn.Module, cfg: StudentConfig) -> tuple[StudentStereo, InheritReport]:
    """The student ``cfg`` describes, with weights sliced from ``parent`` (a trained larger member of its space)."""
    child = build_student(cfg, pretrained=False)
    state, report = inherit_state(parent.state_dict(), child.state_dict())
    child.load_state_dict(state, strict=True)
    return child, report
