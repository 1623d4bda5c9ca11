"""Which channels move together: torch-pruning's dependency graph, repaired, cut into groups by family rules.

The model's family declares its rules (``pruning_rules()`` returning :class:`compress.pruning_rules.FamilyRules`,
as timm models declare ``feature_info``); this module knows no model. After the graph is traced and its
concatenations and broadcasts repaired (:mod:`compress.prune.trace`):

* the computations that reduce or mix channels are cut out ("opaque"): those the rules name as the inputs or
  outputs of channel-mixing layers (in the FoundationStereo family, the geometry lookup feeding the motion
  encoder and the spatial attention's one-channel map), and the declared group-wise correlations (a module
  with its own pruner: feature channels end there, its output has one channel per group);
* the rules then mark what must keep its width (fixed outputs and inputs, layers under a restricted prefix);
* feature channels feeding a correlation are removed in whole multiples of its group count, the same
  number from every group; declared attention projections lose whole heads.

The recurrent update is traced over several iterations, so every module reused across iterations is one
node: the GRU's hidden width couples the convz/convr/convq outputs, the r*h and hx inputs, conv1's input, the
disparity and mask heads' inputs and the context network's initial state.

Pruning is planned on the unpruned graph and applied once per layer (:func:`apply_plan`), so index mappings
never go stale between groups.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from compress.errors import ConfigError
from compress.pruning_rules import PARTS, FamilyRules, under

from .trace import build_graph, is_op, isolate, meta_copy, opaque_cone, rebind

_ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


def rules_for(model: nn.Module) -> FamilyRules:
    """The coupling rules ``model``'s family declares (its ``pruning_rules()`` method)."""
    declare = getattr(model, "pruning_rules", None)
    if not callable(declare):
        raise ConfigError(
            f"{type(model).__name__} declares no pruning rules (a pruning_rules() method returning "
            "compress.pruning_rules.FamilyRules); the coupling of other architectures is unknown"
        )
    return declare()


# ------------------------------------------------------------------------------------ correlation pruner


class CorrelationPruner(tp.pruner.BasePruningFunc):
    """torch-pruning handler of a declared group-wise correlation: feature channels end here, its G outputs
    never change.

    ``prune_in_channels`` and ``prune_out_channels`` are different functions, so the graph does not carry a
    feature-channel removal on into the cost volume (the library's element-wise default would).
    """

    def prune_in_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        layer.in_channels -= len(set(idxs))
        return layer

    def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        return layer  # the correlation's output width is its group count; rules keep it

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.in_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.num_groups


# --------------------------------------------------------------------------------------------- groups


@dataclass
class Member:
    """One layer's share of a group: its name, side ('out' or 'in'), the root channels it follows, its own
    channels (``local``) and its width on that side."""

    name: str
    side: str
    idxs: list[int]
    width: int | None = None
    local: list[int] = field(default_factory=list)


@dataclass
class ChannelGroup:
    """Channels that must be removed together.

    ``unit`` is 'channel', 'head' (remove whole attention heads of ``unit_size`` channels) or 'correlation'
    (``num_groups`` equal correlation groups; the same number of channels leaves each).
    """

    id: int
    root: str
    size: int
    part: str | None
    members: list[Member]
    unit: str = "channel"
    unit_size: int = 1
    num_groups: int = 1
    attention: str | None = None
    prunable: bool = True
    reason: str = ""

    def names(self, side: str = "out") -> list[str]:
        """Member layer names on one side."""
        return sorted({m.name for m in self.members if m.side == side})

    def describe(self) -> dict:
        """JSON-ready summary (for logs and the pruning report)."""
        return {
            "id": self.id, "root": self.root, "size": self.size, "part": self.part, "unit": self.unit,
            "unit_size": self.unit_size, "num_groups": self.num_groups, "prunable": self.prunable,
            "reason": self.reason, "out": self.names("out"), "in": self.names("in"),
        }


class Coupling:
    """The repaired dependency graph of one model and its channel groups; see the module docstring."""

    def __init__(self, model: nn.Module, rules: FamilyRules, dg: tp.DependencyGraph, unresolved: set) -> None:
        self.model = model
        self.rules = rules
        self.dg = dg
        self._unresolved = unresolved
        self.names = {m: n for n, m in model.named_modules()}
        self.groups: list[ChannelGroup] = []
        self._roots: dict[int, tuple[nn.Module, object]] = {}
        self._collect()

    # -- naming
    def _name(self, target) -> str | None:
        if isinstance(target, nn.Parameter):
            return self.dg._param_to_name.get(target)
        return self.names.get(target)

    # -- collection
    def _collect(self) -> None:
        dg = self.dg
        for group in dg.get_all_groups(root_module_types=_ROOT_TYPES):
            root_dep, root_idxs = group[0]
            root = root_dep.target.module
            gid = len(self.groups)
            members: list[Member] = []
            touches_unresolved = False
            correlation = None
            for item in group.items:
                dep, node = item.dep, item.dep.target
                if node in self._unresolved:
                    touches_unresolved = True
                if is_op(node):
                    continue
                name = self._name(node.module)
                if name is None:
                    continue
                side = "out" if dg.is_out_channel_pruning_fn(dep.handler) else "in"
                if name in self.rules.correlations:
                    correlation = node.module
                roots = sorted(int(i) for i in (item.root_idxs or []) if i is not None)
                members.append(Member(name, side, roots, _width(dg, node, side), sorted(int(i) for i in item.idxs)))
            size = len(root_idxs)
            cg = ChannelGroup(id=gid, root=self.names[root], size=size, part=None, members=members)
            self._classify(cg, correlation, touches_unresolved)
            self.groups.append(cg)
            self._roots[gid] = (root, root_dep.handler)

    def _classify(self, group: ChannelGroup, correlation: nn.Module | None, touches_unresolved: bool) -> None:
        rules = self.rules
        outs = group.names("out")
        ins = group.names("in")
        parts = {rules.part_of(n) for n in outs}
        group.part = "+".join(sorted(p for p in parts if p)) if None not in parts else None

        def deny(reason: str) -> None:
            if group.prunable:
                group.prunable, group.reason = False, reason

        if touches_unresolved:
            deny("passes through a concatenation or broadcast whose channel sizes could not be determined")
        for name in outs:
            if name in rules.fixed_out:
                deny(f"{name} keeps its output width (family rule)")
        for name in ins:
            if name in rules.fixed_in:
                deny(f"{name} keeps its input width (family rule)")
        for prefix, allowed in rules.restricted.items():
            for name in outs:
                if under(name, prefix) and not any(name.endswith(s) for s in allowed):
                    deny(f"{name}: only {', '.join(allowed) or 'nothing'} may be pruned under {prefix}")
        if group.part is None:
            deny(f"layers outside every part: {', '.join(n for n in outs if rules.part_of(n) is None)}")
        if group.size <= 1:
            deny("a single channel")
        # Members whose channel count the group cannot match are a coupling the graph got wrong.
        for m in group.members:
            if m.width is not None and any(not 0 <= i < m.width for i in m.local):
                deny(f"{m.name}: channel indices outside its {m.side} width {m.width} (a coupling the graph got wrong)")
        attn = self._attention(outs)
        if attn is not None:
            name, module = attn
            group.unit, group.attention = "head", name
            group.unit_size = module.q_proj.out_features // module.num_heads
            if group.size != module.q_proj.out_features:
                deny(f"{name}: head projections are coupled with other widths")
        if correlation is not None:
            group.unit, group.num_groups = "correlation", correlation.num_groups
            if group.size != correlation.in_channels or group.size % correlation.num_groups:
                deny("correlation features are coupled with other widths")

    def _attention(self, outs: Iterable[str]) -> tuple[str, nn.Module] | None:
        for name in outs:
            if name.endswith(".q_proj") or name.endswith(".k_proj") or name.endswith(".v_proj"):
                parent = name.rsplit(".", 1)[0]
                if parent in self.rules.attention:
                    return parent, self.model.get_submodule(parent)
        return None

    # -- planning
    def tp_group(self, gid: int, idxs: list[int] | None = None):
        """The torch-pruning Group of ``gid`` for root channels ``idxs`` (all channels when None)."""
        root, handler = self._roots[gid]
        if idxs is None:
            idxs = list(range(self.groups[gid].size))
        return self.dg.get_pruning_group(root, handler, list(idxs))

    def prunable(self, parts: Iterable[str] | None = None) -> list[ChannelGroup]:
        """Prunable groups whose every layer lies in ``parts`` (all parts when None)."""
        wanted = set(PARTS if parts is None else parts)
        return [g for g in self.groups if g.prunable and set(g.part.split("+")) <= wanted]

    def group_of(self, name: str, side: str = "out") -> ChannelGroup:
        """The group holding layer ``name`` on ``side``."""
        for g in self.groups:
            if any(m.name == name and m.side == side for m in g.members):
                return g
        raise KeyError(f"no group holds {name} ({side})")


def _width(dg: tp.DependencyGraph, node, side: str) -> int | None:
    try:
        return dg.get_out_channels(node) if side == "out" else dg.get_in_channels(node)
    except Exception:  # layers without a channel notion for this side
        return None


# --------------------------------------------------------------------------------------------- analysis


def analyze(
    model: nn.Module,
    rules: FamilyRules | None = None,
    height: int = 32,
    width: int = 64,
    iters: int = 2,
) -> Coupling:
    """Trace ``model`` (``iters`` >= 2 GRU iterations at ``height`` x ``width``) and return its channel groups."""
    if iters < 2:
        raise ConfigError(f"iters={iters}: the graph must see at least 2 GRU iterations to couple the recurrence")
    rules = rules or rules_for(model)
    meta = meta_copy(model, rules.frozen)
    left = torch.empty(1, 3, height, width, device="meta")
    gradfn_module: dict = {}
    pruners = {type(meta.get_submodule(n)): CorrelationPruner() for n in rules.correlations}
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the library warns about every op it treats as element-wise
        dg, unresolved = build_graph(meta, (left, left), iters, pruners, gradfn_module)
    names = dict(meta.named_modules())
    cut: set = set()
    for name in rules.opaque_inputs:
        if name in names and names[name] in dg.module2node:
            cut |= opaque_cone(dg, dg.module2node[names[name]], upstream=True)
    for name in rules.opaque_outputs:
        if name in names and names[name] in dg.module2node:
            cut |= opaque_cone(dg, dg.module2node[names[name]], upstream=False)
    isolate(cut)
    rebind(dg, meta, model)
    return Coupling(model, rules, dg, unresolved)


# -------------------------------------------------------------------------------------------- applying


def apply_plan(coupling: Coupling, removals: dict[int, list[int]]) -> dict[str, int]:
    """Remove ``removals[group id]`` (root channel indices) from every coupled layer; returns new widths.

    All index sets are computed on the unpruned graph and each layer is cut once, so a layer shared by
    several groups (e.g. a convolution reading a concatenation) loses exactly the union of its channels.
    """
    dg = coupling.dg
    cuts: dict = {}
    for gid, idxs in removals.items():
        if not idxs:
            continue
        group = coupling.groups[gid]
        if not group.prunable:
            raise ConfigError(f"group {gid} ({group.root}) is not prunable: {group.reason}")
        for dep, dep_idxs in coupling.tp_group(gid, idxs):
            if is_op(dep.target):
                continue
            key = (dep.target, dep.handler)
            cuts.setdefault(key, set()).update(int(i) for i in dep_idxs)
    for (node, handler), idxs in cuts.items():
        handler.__self__.pruning_dim = node.pruning_dim
        target = node.module
        if isinstance(target, nn.Parameter):
            name = dg._param_to_name[target]
            owner_name, _, attr = name.rpartition(".")
            owner = coupling.model.get_submodule(owner_name) if owner_name else coupling.model
            setattr(owner, attr, handler(target, sorted(idxs)))
        else:
            handler(target, sorted(idxs))
    widths = {}
    for gid, idxs in removals.items():
        group = coupling.groups[gid]
        if group.attention is not None and idxs:
            module = coupling.model.get_submodule(group.attention)
            module.num_heads -= len(idxs) // group.unit_size
        widths[group.root] = group.size - len(idxs)
    return widths


def correlation_split(size: int, num_groups: int) -> list[range]:
    """Channel ranges of each correlation group of a ``size``-wide feature."""
    per = size // num_groups
    return [range(g * per, (g + 1) * per) for g in range(num_groups)]


def keep_multiple(group: ChannelGroup, round_to: int) -> int:
    """Granularity of the kept width: kept channels are a multiple of this."""
    if group.unit == "head":
        return group.unit_size
    if group.unit == "correlation":
        return group.num_groups * (round_to // math.gcd(group.num_groups, round_to))
    return round_to
