"""What a pruned model costs: MACs, parameters and latency as measured, and per-layer costs to predict a plan's."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.backends import get_backend
from compress.latency import measure
from search_spaces import count_macs, count_params
from teacher import model_iters

from .config import PruneConfig
from .coupling import Coupling
from .trace import meta_copy


def measure_cost(model: nn.Module, cfg: PruneConfig, latency: bool) -> dict[str, Any]:
    """MACs and parameters (at the latency size and iterations), and the latency when ``latency``."""
    spec = cfg.latency
    iters = model_iters(model, spec.iters, key="latency.iters")
    cost = count_macs(model, spec.height, spec.width, iters=iters)
    out: dict[str, Any] = {"gmacs": cost.gmacs, "macs": cost.macs, "mparams": cost.params / 1e6, "latency": None}
    if latency:
        device = next(model.parameters()).device
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the export for ONNX/TensorRT timing
            warnings.filterwarnings("ignore", message=".*instance_norm.*")
            stats = measure(model, spec.backend, spec.height, spec.width, iters=iters,
                            device=spec.device or (None if get_backend(spec.backend).cuda_only else device),
                            **spec.timing())
        out["latency"] = {**stats.to_dict(), "warmup": spec.warmup}
    return out


@dataclass
class LayerCosts:
    """MACs (summed over every call, e.g. all GRU iterations) and parameters of each convolution and linear
    layer, plus the whole model's totals: a cheap predictor of what a pruning plan saves."""

    macs: dict[str, int]
    params: dict[str, int]
    depthwise: set[str]
    total_macs: int
    total_params: int

    def predict(self, coupling: Coupling, plan: dict[int, list[int]]) -> tuple[float, float]:
        """(MACs, parameters) after ``plan``: each layer scales with its kept input and output fractions."""
        gone: dict[tuple[str, str], int] = {}
        widths: dict[tuple[str, str], int] = {}
        for gid, idxs in plan.items():
            removed = set(idxs)
            for m in coupling.groups[gid].members:
                if m.name in self.macs and m.width:
                    key = (m.name, m.side)
                    gone[key] = gone.get(key, 0) + len(removed.intersection(m.idxs))
                    widths[key] = m.width
        macs, params = float(self.total_macs), float(self.total_params)
        for name in {n for n, _ in gone}:
            ins = 1 - gone.get((name, "in"), 0) / widths.get((name, "in"), 1)
            outs = 1 - gone.get((name, "out"), 0) / widths.get((name, "out"), 1)
            factor = outs if name in self.depthwise else max(ins, 0.0) * max(outs, 0.0)
            macs -= self.macs[name] * (1 - factor)
            params -= self.params[name] * (1 - factor)
        return macs, params


def layer_costs(model: nn.Module, height: int, width: int, iters: int, total_macs: int | None = None) -> LayerCosts:
    """Per-layer MACs and parameters from one forward on a meta-device copy (shapes only); the model's total
    MACs come from ``search_spaces.count_macs`` unless given."""

    macs: dict[str, int] = {}
    meta = meta_copy(model, ())
    names = {m: n for n, m in meta.named_modules()}

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        name = names[module]
        if isinstance(module, nn.Linear):
            work = output.numel() * module.in_features
        else:  # convolution (transposed ones: every input pixel meets the whole kernel)
            k = math.prod(module.kernel_size) * module.in_channels // module.groups
            work = (inputs[0].numel() // module.in_channels * module.out_channels if module.transposed
                    else output.numel()) * k
        macs[name] = macs.get(name, 0) + int(work)

    handles = [m.register_forward_hook(hook) for m in meta.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    left = torch.empty(1, 3, height, width, device="meta")
    try:
        with torch.no_grad():
            meta(left, left, iters=iters, test_mode=True)
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    params = {n: sum(p.numel() for p in modules[n].parameters(recurse=False)) for n in macs}
    depthwise = {n for n in macs if isinstance(modules[n], nn.modules.conv._ConvNd)
                 and modules[n].groups == modules[n].in_channels > 1}
    if total_macs is None:
        total_macs = count_macs(model, height, width, iters=iters).macs
    return LayerCosts(macs, params, depthwise, int(total_macs), count_params(model))


def step_target(kind: str, value: float, cost: dict[str, Any], step_ratio: float,
                costs: LayerCosts) -> tuple[str, float, LayerCosts]:
    """What one step aims at: the budget, but never more than ``step_ratio`` of the current MACs (or
    parameters) at once. A latency budget is approached through MACs, in proportion to the latency gap."""
    if kind == "mparams":
        return "params", max(value * 1e6, costs.total_params * (1 - step_ratio)), costs
    if kind == "gmacs":
        return "macs", max(value * 1e9, costs.total_macs * (1 - step_ratio)), costs
    gap = value / float(cost["latency"]["median_ms"])
    return "macs", costs.total_macs * max(1 - step_ratio, gap), costs


def budget_metric(cost: dict[str, Any], kind: str) -> float:
    """The measured quantity a budget of ``kind`` bounds."""
    if kind == "latency_ms":
        return float(cost["latency"]["median_ms"])
    return float(cost[kind])
