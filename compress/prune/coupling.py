"""Which channels move together in the FoundationStereo family: torch-pruning's dependency graph, repaired.

torch-pruning traces one forward pass through autograd and treats every operation it does not know as
element-wise. On this family that couples channels that have nothing to do with each other, so the graph is
repaired before any group is used:

* concatenations are re-mapped from the real tensor sizes recorded by autograd (the library infers them and
  gets them wrong when an input carries no gradient, e.g. the detached disparity beside the motion feature);
* the computations that reduce or mix channels are cut out ("opaque"): the geometry lookup feeding the motion
  encoder (its width is fixed), the spatial attention's channel pooling and the broadcast of its one-channel
  map over the hidden state, and the group-wise correlation (a module with its own pruner: feature channels
  end there, its output has one channel per group);
* family rules then mark what must keep its width: the disparity head, the upsampling-mask head, the convex
  upsampler's nine weights, the classifier's single logit, the filtered volume the geometry lookup reads,
  the motion encoder's inputs, the disparity transformer's embedding (its positional table is fixed), and the
  timm backbone's stage widths (timm derives split sizes, heads and positional projections from them; only
  its MLP hidden widths are pruned);
* feature channels feeding the correlation are removed in whole multiples of its group count, the same
  number from every group; attention projections lose whole heads.

The recurrent update is traced over several iterations, so every module reused across iterations is one
node: the GRU's hidden width couples the convz/convr/convq outputs, the r*h and hx inputs, conv1's input, the
disparity and mask heads' inputs and the context network's initial state.

The graph is traced on a meta-device copy (shapes only, no arithmetic) and then pointed at the real model's
layers by name. Pruning is planned on the unpruned graph and applied once per layer (:func:`apply_plan`), so
index mappings never go stale between groups.

One module over the ~500-line guide: every repair of the dependency graph (concatenations, opaque ops, the GRU
recurrence, correlation groups, attention heads, fixed heads) walks the same traced graph and must be applied
in one order; spread over files, that order would be implicit.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops as tp_ops

from compress.errors import ConfigError
from teacher.layers import DisparityMultiheadAttention, DisparityTransformerLayer

PARTS = ("backbone", "cost_filtering", "refinement")
"""Names of the parts a pruning scope is made of."""

_OP_TYPES = (
    tp_ops._ElementWiseOp,
    tp_ops._ConcatOp,
    tp_ops._SplitOp,
    tp_ops._ReshapeOp,
    tp_ops._SliceOp,
    tp_ops._ExpandOp,
    tp_ops._UnbindOp,
    tp_ops._OutputOp,
)
_ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


# ------------------------------------------------------------------------------------------------ rules


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

    def part_of(self, name: str) -> str | None:
        """The part a module name belongs to, or None."""
        for part, prefixes in self.parts.items():
            if any(_under(name, p) for p in prefixes):
                return part
        return None


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _last_conv(model: nn.Module, prefix: str) -> str:
    """Name of the last convolution inside the module called ``prefix``."""
    module = model.get_submodule(prefix)
    names = [n for n, m in module.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not names:
        raise ConfigError(f"{prefix} holds no convolution; this is not a FoundationStereo-family model")
    return f"{prefix}.{names[-1]}"


def _transformer_norms(model: nn.Module) -> list[str]:
    return [
        f"{n}.{norm}"
        for n, m in model.named_modules()
        if isinstance(m, DisparityTransformerLayer)
        for norm in ("norm1", "norm2")
    ]


def _refinement_fixed(model: nn.Module, upsampler: str) -> tuple[str, ...]:
    return (
        _last_conv(model, "update_block.disp_head"),
        _last_conv(model, "update_block.mask"),
        _last_conv(model, upsampler),
    )


def rules_for(model: nn.Module) -> FamilyRules:
    """The coupling rules of a student (``StudentStereo``) or teacher (``FoundationStereo``)."""
    from search_spaces.model import StudentStereo
    from teacher.model import FoundationStereo

    common_in = ("update_block.encoder.convc1", "update_block.encoder.convd1")
    opaque_in = ("update_block.encoder.convc1", "sam.samconv")
    opaque_out = ("sam.samconv",)
    # A searched student's last up step may be a merge block (search_spaces.blocks) instead of conv_out.
    last = "cost_agg.post8_to_4" if getattr(model.cost_agg, "post8_to_4", None) is not None else "cost_agg.conv_out"
    volume_out = _last_conv(model, last)
    if isinstance(model, StudentStereo):
        return FamilyRules(
            family="student",
            parts={
                "backbone": ("feature",),
                "cost_filtering": ("proj_cmb", "corr_stem", "corr_feature_att", "cost_agg", "classifier"),
                "refinement": ("cnet", "cam", "sam", "update_block", "upsampler", "stem_2"),
            },
            fixed_out=(*_refinement_fixed(model, "upsampler.spx_gru"), _last_conv(model, "classifier"), volume_out,
                       *_transformer_norms(model)),
            fixed_in=common_in,
            opaque_inputs=opaque_in,
            opaque_outputs=opaque_out,
            restricted={"feature.stem": (), "feature.stages": ("mlp.fc1",)},
        )
    if isinstance(model, FoundationStereo):
        return FamilyRules(
            family="teacher",
            parts={
                "refinement": ("cnet.outputs04", "cnet.outputs08", "cnet.outputs16", "cam", "sam", "update_block",
                               "spx_2_gru", "spx_gru", "stem_2"),
            },
            fixed_out=(*_refinement_fixed(model, "spx_gru"), _last_conv(model, "classifier"), volume_out,
                       *_transformer_norms(model)),
            fixed_in=common_in,
            opaque_inputs=opaque_in,
            opaque_outputs=opaque_out,
            frozen=("feature.dino",),
        )
    raise ConfigError(
        f"pruning rules exist for StudentStereo and FoundationStereo, got {type(model).__name__}; the coupling of "
        "other architectures is unknown"
    )


# ------------------------------------------------------------------------------------ correlation pruner


class CorrelationPruner(tp.pruner.BasePruningFunc):
    """torch-pruning handler of ``GroupwiseCorrelation``: feature channels end here, its G outputs never change.

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


class _Ranges:
    """Index mapping through a channel concatenation at known offsets (an input may appear several times)."""

    def __init__(self, ranges: list[tuple[int, int]], to_input: bool) -> None:
        self.ranges = ranges
        self.to_input = to_input

    def __call__(self, idxs: list) -> list:
        out = []
        for i in idxs:
            for start, end in self.ranges:
                if self.to_input:
                    if start <= i.idx < end:
                        out.append(tp._helpers._HybridIndex(idx=i.idx - start, root_idx=i.root_idx))
                else:
                    out.append(tp._helpers._HybridIndex(idx=i.idx + start, root_idx=i.root_idx))
        return out


def _is_op(node) -> bool:
    return isinstance(node.module, _OP_TYPES)


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
        from search_spaces.model import GroupwiseCorrelation

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
                if _is_op(node):
                    continue
                name = self._name(node.module)
                if name is None:
                    continue
                side = "out" if dg.is_out_channel_pruning_fn(dep.handler) else "in"
                if isinstance(node.module, GroupwiseCorrelation):
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
                if _under(name, prefix) and not any(name.endswith(s) for s in allowed):
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

    def _attention(self, outs: Iterable[str]) -> tuple[str, DisparityMultiheadAttention] | None:
        for name in outs:
            if name.endswith(".q_proj") or name.endswith(".k_proj") or name.endswith(".v_proj"):
                parent = name.rsplit(".", 1)[0]
                module = self.model.get_submodule(parent)
                if isinstance(module, DisparityMultiheadAttention):
                    return parent, module
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


def _trace_forward(iters: int, gradfn_module: dict, types: tuple):
    """A forward_fn for the graph: several GRU iterations, recording every module call's output grad_fn."""

    def hook(module, inputs, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            gradfn_module[out.grad_fn] = module

    def forward(model: nn.Module, inputs):
        handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, types)]
        try:
            init, preds = model(inputs[0], inputs[1], iters=iters, test_mode=False)
        finally:
            for h in handles:
                h.remove()
        return [init, *preds]

    return forward


def _node_of(dg: tp.DependencyGraph, fn, gradfn_module: dict, by_gradfn: dict):
    module = gradfn_module.get(fn)
    if module is not None and module in dg.module2node:
        return dg.module2node[module]
    return by_gradfn.get(fn)


def _fix_concats(dg: tp.DependencyGraph, gradfn_module: dict) -> set:
    """Map every channel concatenation from the real input sizes; returns the nodes that cannot be mapped."""
    by_gradfn = {n.grad_fn: n for n in dg.module2node.values() if _is_op(n)}
    unresolved = set()
    for node in list(dg.module2node.values()):
        if node.type != tp_ops.OPTYPE.CONCAT:
            continue
        fn = node.grad_fn
        shape = list(fn._input_metadata[0].shape)
        dim = fn._saved_dim % len(shape)
        node.enable_index_mapping = False  # the library must not overwrite these mappings
        if dim != 1:
            continue  # not the channel axis: every input keeps its channel numbering
        sizes: list[int | None] = []
        owners = []
        lost = False
        for nxt, out_idx in fn.next_functions:
            if nxt is None:
                sizes.append(None)
                owners.append(None)
                continue
            if type(nxt).__name__ == "AccumulateGrad":
                sizes.append(int(nxt.variable.shape[dim]))
                owners.append(None)
                continue
            sizes.append(int(nxt._input_metadata[out_idx].shape[dim]))
            owners.append(_node_of(dg, nxt, gradfn_module, by_gradfn))
            lost |= owners[-1] is None
        unknown = [i for i, s in enumerate(sizes) if s is None]
        traced = [i for i, o in enumerate(owners) if o is not None]
        # The library still sizes concatenations itself before it looks at enable_index_mapping.
        node.module.concat_sizes = [sizes[i] or 0 for i in traced]
        if lost:
            unresolved.add(node)  # a traced input whose graph node we cannot name: its mapping would be a guess
            continue
        if len(unknown) == 1:
            sizes[unknown[0]] = shape[dim] - sum(s for s in sizes if s is not None)
        elif unknown and traced and min(unknown) < max(traced):
            unresolved.add(node)  # several inputs of unknown size before a traced one: offsets unknowable
            continue
        ranges: dict = {}
        start = 0
        for size, owner in zip(sizes, owners, strict=True):
            if owner is not None:
                ranges.setdefault(owner, []).append((start, start + size))
            start += size or 0
        for owner, spans in ranges.items():
            for dep in node.dependencies:
                if dep.target is owner:
                    dep.index_mapping[1] = _Ranges(spans, to_input=True)
            for dep in owner.dependencies:
                if dep.target is node:
                    dep.index_mapping[1] = _Ranges(spans, to_input=False)
    return unresolved


def _fix_expands(dg: tp.DependencyGraph) -> set:
    """Broadcasts along non-channel axes keep channel numbering; the library maps 5-D ones as grouped-query
    attention. Returns the expands that do change the channel count (left unmapped, their groups refused)."""
    changed = set()
    for node in dg.module2node.values():
        if node.type != tp_ops.OPTYPE.EXPAND:
            continue
        node.enable_index_mapping = False
        before = list(getattr(node.grad_fn, "_saved_self_sym_sizes", []))
        after = list(node.grad_fn._input_metadata[0].shape)
        for dep in node.dependencies:
            dep.index_mapping[0] = None
        for other in node.inputs:
            for dep in other.dependencies:
                if dep.target is node:
                    dep.index_mapping[0] = None
        if len(before) != len(after) or len(after) < 2 or before[1] != after[1]:
            changed.add(node)
    return changed


def _cone(dg: tp.DependencyGraph, anchor, upstream: bool) -> set:
    """Operation nodes that exclusively feed (upstream) or are exclusively fed by (downstream) ``anchor``."""
    step = (lambda n: n.inputs) if upstream else (lambda n: n.outputs)
    back = (lambda n: n.outputs) if upstream else (lambda n: n.inputs)
    cone, frontier = set(), list(step(anchor))
    while frontier:
        node = frontier.pop()
        if node in cone or not _is_op(node):
            continue
        cone.add(node)
        frontier.extend(step(node))
    changed = True
    while changed:
        changed = False
        for node in list(cone):
            if any(other is not anchor and other not in cone for other in back(node)):
                cone.discard(node)
                changed = True
    return cone


def _isolate(nodes: set) -> None:
    """Remove every edge and dependency touching ``nodes``: the channels they carry are not coupled."""
    for node in nodes:
        for other in set(node.inputs) | set(node.outputs):
            other.inputs = [n for n in other.inputs if n is not node]
            other.outputs = [n for n in other.outputs if n is not node]
            other.dependencies = [d for d in other.dependencies if d.target is not node]
        node.inputs, node.outputs, node.dependencies = [], [], []


def _build_graph(model: nn.Module, inputs: tuple, iters: int, pruners: dict, gradfn_module: dict):
    """``DependencyGraph.build_dependency`` step by step, with our concatenation and broadcast mappings put in
    before the library computes its own (which fails on this family: it cannot size inputs without gradients)."""
    from torch_pruning.dependency import index_mapping, shape_infer

    dg = tp.DependencyGraph()
    dg.verbose = False
    dg.model = model
    dg._module2name = {module: name for name, module in model.named_modules()}
    for kind, pruner in pruners.items():
        dg.register_customized_layer(kind, pruner)
    dg.ignored_params = []
    dg._param_to_name, dg.unwrapped_parameters = dg._detect_unwrapped_parameters(None)
    registered = tuple(tp_ops.type2class(t) for t in dg.REGISTERED_PRUNERS) + tuple(pruners)
    registered = tuple(t for t in registered if isinstance(t, type))
    dg.module2node = dg._trace(model, inputs, _trace_forward(iters, gradfn_module, registered), output_transform=None)
    dg._build_dependency(dg.module2node)
    shape_infer.init_shape_information(dg)
    unresolved = _fix_concats(dg, gradfn_module) | _fix_expands(dg)
    index_mapping.update_index_mapping(dg)
    _freeze_mappings(dg)
    return dg, unresolved


_MAPPED_TYPES = (tp_ops.OPTYPE.CONCAT, tp_ops.OPTYPE.SPLIT, tp_ops.OPTYPE.RESHAPE, tp_ops.OPTYPE.EXPAND,
                 tp_ops.OPTYPE.UNBIND, tp_ops.OPTYPE.SLICE)


def _freeze_mappings(dg: tp.DependencyGraph) -> None:
    """Keep the index mappings computed on the unpruned graph.

    The library recomputes every mapping (recursive channel inference) on each group query, which costs
    seconds on this family and is only needed when pruning through the graph; plans are applied to the
    unpruned graph (:func:`apply_plan`), so the mappings never change. The node type only dispatches that
    recomputation; pruning handlers come from the module class.
    """
    for node in dg.module2node.values():
        if node.type in _MAPPED_TYPES:
            node.type = tp_ops.OPTYPE.ELEMENTWISE


def analyze(
    model: nn.Module,
    rules: FamilyRules | None = None,
    height: int = 32,
    width: int = 64,
    iters: int = 2,
) -> Coupling:
    """Trace ``model`` (``iters`` >= 2 GRU iterations at ``height`` x ``width``) and return its channel groups."""
    from search_spaces.model import GroupwiseCorrelation

    if iters < 2:
        raise ConfigError(f"iters={iters}: the graph must see at least 2 GRU iterations to couple the recurrence")
    rules = rules or rules_for(model)
    meta = _meta_copy(model, rules.frozen)
    left = torch.empty(1, 3, height, width, device="meta")
    gradfn_module: dict = {}
    pruners = {GroupwiseCorrelation: CorrelationPruner()}
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the library warns about every op it treats as element-wise
        dg, unresolved = _build_graph(meta, (left, left), iters, pruners, gradfn_module)
    names = dict(meta.named_modules())
    cut: set = set()
    for name in rules.opaque_inputs:
        if name in names and names[name] in dg.module2node:
            cut |= _cone(dg, dg.module2node[names[name]], upstream=True)
    for name in rules.opaque_outputs:
        if name in names and names[name] in dg.module2node:
            cut |= _cone(dg, dg.module2node[names[name]], upstream=False)
    _isolate(cut)
    _rebind(dg, meta, model)
    return Coupling(model, rules, dg, unresolved)


def _meta_copy(model: nn.Module, frozen: tuple[str, ...]) -> nn.Module:
    """A copy of ``model`` on the meta device (shapes only: tracing costs no arithmetic and no memory).

    Every parameter outside ``frozen`` takes part in autograd, whatever the original's requires_grad, so a
    model loaded for inference (all frozen) is traced the same way.
    """
    memo: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in memo:
            grad = not any(_under(name, f) for f in frozen)
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=grad)
    for b in model.buffers():
        memo.setdefault(id(b), torch.empty_like(b, device="meta"))
    meta = copy.deepcopy(model, memo)
    return meta.eval()


def _rebind(dg: tp.DependencyGraph, meta: nn.Module, model: nn.Module) -> None:
    """Point the graph (traced on the meta copy) at the real model's modules and parameters, by name."""
    meta_names = {m: n for n, m in meta.named_modules()}
    real = dict(model.named_modules())
    param_names = dict(dg._param_to_name)
    module2node = {}
    for target, node in dg.module2node.items():
        if isinstance(target, nn.Parameter):
            node.module = model.get_parameter(param_names[target])
        elif target in meta_names:
            node.module = real[meta_names[target]]
        module2node[node.module] = node
    dg.module2node = module2node
    dg.model = model
    dg._module2name = {m: n for n, m in model.named_modules()}
    dg._param_to_name = {model.get_parameter(n): n for n in param_names.values()}
    dg.unwrapped_parameters = [
        type(u)(parameters=model.get_parameter(param_names[u.parameters]), pruning_dim=u.pruning_dim)
        for u in dg.unwrapped_parameters
    ]


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
            if _is_op(dep.target):
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
