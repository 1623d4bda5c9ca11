"""torch-pruning's dependency graph of a model, traced on a meta-device copy and repaired.

torch-pruning traces one forward pass through autograd and treats every operation it does not know as
element-wise. On the FoundationStereo family that couples channels that have nothing to do with each other,
so :func:`build_graph` repairs the graph before any group is used:

* concatenations are re-mapped from the real tensor sizes recorded by autograd (the library infers them and
  gets them wrong when an input carries no gradient, e.g. the detached disparity beside the motion feature);
* broadcasts along non-channel axes keep their channel numbering;
* index mappings are frozen on the unpruned graph.

:func:`opaque_cone` and :func:`isolate` then cut out the computations a family declares as mixing channels.
The recurrent update is traced over several iterations, so every module reused across iterations is one node.
The graph is traced on a meta-device copy (:func:`meta_copy`: shapes only, no arithmetic) and then pointed at
the real model's layers by name (:func:`rebind`).
"""

from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops as tp_ops
from torch_pruning.dependency import index_mapping, shape_infer

from compress.pruning_rules import under

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


def is_op(node) -> bool:
    """Whether a graph node is an operation (concatenation, split, ...) rather than a layer."""
    return isinstance(node.module, _OP_TYPES)


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
    by_gradfn = {n.grad_fn: n for n in dg.module2node.values() if is_op(n)}
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


def opaque_cone(dg: tp.DependencyGraph, anchor, upstream: bool) -> set:
    """Operation nodes that exclusively feed (upstream) or are exclusively fed by (downstream) ``anchor``."""
    step = (lambda n: n.inputs) if upstream else (lambda n: n.outputs)
    back = (lambda n: n.outputs) if upstream else (lambda n: n.inputs)
    cone, frontier = set(), list(step(anchor))
    while frontier:
        node = frontier.pop()
        if node in cone or not is_op(node):
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


def isolate(nodes: set) -> None:
    """Remove every edge and dependency touching ``nodes``: the channels they carry are not coupled."""
    for node in nodes:
        for other in set(node.inputs) | set(node.outputs):
            other.inputs = [n for n in other.inputs if n is not node]
            other.outputs = [n for n in other.outputs if n is not node]
            other.dependencies = [d for d in other.dependencies if d.target is not node]
        node.inputs, node.outputs, node.dependencies = [], [], []


def build_graph(model: nn.Module, inputs: tuple, iters: int, pruners: dict,
                gradfn_module: dict) -> tuple[tp.DependencyGraph, set]:
    """``DependencyGraph.build_dependency`` step by step, with our concatenation and broadcast mappings put in
    before the library computes its own (which fails on this family: it cannot size inputs without gradients)."""
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
    unpruned graph (:func:`compress.prune.coupling.apply_plan`), so the mappings never change. The node type
    only dispatches that recomputation; pruning handlers come from the module class.
    """
    for node in dg.module2node.values():
        if node.type in _MAPPED_TYPES:
            node.type = tp_ops.OPTYPE.ELEMENTWISE


def meta_copy(model: nn.Module, frozen: tuple[str, ...]) -> nn.Module:
    """A copy of ``model`` on the meta device (shapes only: tracing costs no arithmetic and no memory).

    Every parameter outside ``frozen`` takes part in autograd, whatever the original's requires_grad, so a
    model loaded for inference (all frozen) is traced the same way.
    """
    memo: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in memo:
            grad = not any(under(name, f) for f in frozen)
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=grad)
    for b in model.buffers():
        memo.setdefault(id(b), torch.empty_like(b, device="meta"))
    meta = copy.deepcopy(model, memo)
    return meta.eval()


def rebind(dg: tp.DependencyGraph, meta: nn.Module, model: nn.Module) -> None:
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
