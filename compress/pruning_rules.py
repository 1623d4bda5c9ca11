"""The pruning rules a model family declares, as timm models declare ``feature_info``.

A model class that can be pruned has a ``pruning_rules()`` method returning :class:`FamilyRules`: the
knowledge of its architecture that torch-pruning's dependency graph lacks (which parts there are, which widths
are fixed, where channels stop being coupled). ``compress.prune`` reads the declaration and knows no model;
the families (``teacher``, ``search_spaces``) declare theirs without knowing the prune stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

PARTS = ("backbone", "cost_filtering", "refinement")
"""Names of the parts a pruning scope is made of."""


@dataclass
class FamilyRules:
    """The model-family knowledge the dependency graph lacks (module names are ``named_modules`` names)."""

    family: str
    parts: dict[str, tuple[str, ...]]
    """Part name -> module-name prefixes that belong to it."""
    fixed_out: tuple[str, ...] = ()
    """Layers whose output width must stay (heads read by fixed-size consumers, widths read by the geometry)."""
    fixed_in: tuple[str, ...] = ()
    """Layers whose input width must stay."""
    opaque_inputs: tuple[str, ...] = ()
    """Layers whose inputs come from channel-mixing computations that end the coupling there."""
    opaque_outputs: tuple[str, ...] = ()
    """Layers whose outputs feed channel-mixing computations (e.g. a one-channel map broadcast over others)."""
    restricted: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Prefix -> name suffixes of the only layers under it whose outputs may be pruned."""
    frozen: tuple[str, ...] = ()
    """Prefixes of frozen sub-networks left out of the trace (the teacher's ViT)."""
    attention: tuple[str, ...] = ()
    """Multi-head attention modules (``q_proj``/``k_proj``/``v_proj`` and ``num_heads``): they lose whole heads."""
    correlations: tuple[str, ...] = ()
    """Group-wise correlation modules (``in_channels``, ``num_groups``): feature channels end there, removed in
    equal numbers from every group; their output has one channel per group."""

    def part_of(self, name: str) -> str | None:
        """The part a module name belongs to, or None."""
        for part, prefixes in self.parts.items():
            if any(under(name, p) for p in prefixes):
                return part
        return None


def under(name: str, prefix: str) -> bool:
    """Whether module ``name`` is ``prefix`` or lies inside it."""
    return name == prefix or name.startswith(prefix + ".")


def names_of(model: nn.Module, kind: type[nn.Module]) -> tuple[str, ...]:
    """Names of every module of class ``kind`` inside ``model``."""
    return tuple(n for n, m in model.named_modules() if isinstance(m, kind))
