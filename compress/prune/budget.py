"""Prune to a budget: prune a step -> distil briefly -> measure, until the budget is met; then recover.

The budget is a median latency on a chosen backend (``compress.latency.measure``), MACs or parameters
(``search_spaces.counting``), or a fraction of channels. Each step re-traces the model, ranks the in-scope
channels (``importance``), keeps ``(1 - step_ratio) ** k`` of the original widths and distils against the
teacher for a few steps; a final recovery distillation follows. The result is saved as a student (or pruned
teacher) folder with ``prune_result.json`` beside it: the budget, whether and how it was met (backend,
device, shapes, precision, iterations, timing statistics), every step, and the agreement with the teacher.

One module over the ~500-line guide: the loop, its step and result records and the saved report are one
procedure whose parts only make sense together.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.atomic import atomic_write_text
from compress.device import pick_device
from compress.errors import CheckpointError, ConfigError, DataError, FFSCError
from compress.models import resolve_model
from compress.terminal import progress_bar
from compress.training import fit
from teacher import model_iters

from .config import PruneConfig
from .coupling import Coupling, FamilyRules, analyze, apply_plan, rules_for
from .importance import accumulate_gradients, group_scores, plan_removals

Callback = Callable[[str, int, dict[str, float]], None]
"""Called as callback(kind, step, metrics); kind is 'baseline', 'step', 'recovery' or 'end'."""

RESULT_NAME = "prune_result.json"
LOG_NAME = "log.jsonl"
MODEL_DIR = "model"


# ------------------------------------------------------------------------------------------------ models


def deploy_iters(model: nn.Module) -> int:
    """The GRU iteration count a model is deployed with (student ``iters``, teacher ``valid_iters``)."""
    return model_iters(model)  # the one rule, shared with the pipeline, labelling and inference


def _check_scope(rules: FamilyRules, scope: Iterable[str]) -> None:
    missing = [p for p in scope if p not in rules.parts]
    if missing:
        raise ConfigError(
            f"scope {', '.join(missing)} cannot be pruned on a {rules.family}; its prunable parts are "
            f"{', '.join(rules.parts)}"
        )


# --------------------------------------------------------------------------------------------- data


def _crop(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    h, w = t.shape[-2:]
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return t[..., top : top + size[0], left : left + size[1]]


def build_samples(cfg: PruneConfig) -> list[dict[str, Any]]:
    """The calibration / distillation samples: tensors cropped to multiples of 32 (see DataSpec)."""
    from compress.distill import build_dataset

    spec = cfg.data
    dataset = build_dataset(spec, seed=cfg.seed)
    if len(dataset) == 0:
        raise DataError(f"dataset {spec.path} holds no samples")
    return crop_samples(dataset, spec.num_samples, spec.size)


def crop_samples(dataset, num_samples: int, size: list[int] | tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """The first ``num_samples`` items of a stereo dataset, centre-cropped to ``size`` (default: each image
    rounded down to multiples of 32)."""
    samples = []
    for i in range(min(num_samples, len(dataset))):
        item = dataset[i]
        h, w = item["left"].shape[-2:]
        crop = tuple(size) if size else (h // 32 * 32, w // 32 * 32)
        if crop[0] < 32 or crop[1] < 32 or crop[0] > h or crop[1] > w:
            raise DataError(f"sample {item.get('name', i)} is {h}x{w}; it cannot be cropped to {crop[0]}x{crop[1]}")
        samples.append({k: _crop(v, crop) if k in ("left", "right", "disp", "valid", "nonocc") else v
                        for k, v in item.items()})
    return samples


def _batches(samples: list[dict], batch_size: int, start: int, count: int) -> list[list[int]]:
    order = [(start * batch_size + i) % len(samples) for i in range(count * batch_size)]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _collate(samples: list[dict], idxs: list[int], device: torch.device) -> dict[str, Any]:
    out = {}
    for key in ("left", "right", "disp", "valid", "has_gt"):
        if key in samples[idxs[0]]:
            out[key] = torch.stack([torch.as_tensor(samples[i][key]) for i in idxs]).to(device)
    return out


class Distiller:
    """Teacher targets computed once per sample, and the distillation loss of ``compress.distill``.

    The feature loss is off (pruned widths differ from the teacher's; an adapter would have to be learned);
    the cost-volume KL and the sequence loss to the teacher's disparity drive both Taylor importance and the
    recovery. Ground truth, where a sample has it, joins with weight ``gt_weight`` (0 by default: recovery
    restores what the pruned model lost against its teacher; a ground-truth term pulls elsewhere). The term
    pulling the initial (cost-volume) disparity towards the teacher's final one has weight ``init_weight``
    (0 by default: the cost-volume KL already supervises that branch, and the pull would move an unpruned
    cost volume away from what the refinement was trained on).
    """

    def __init__(self, teacher: nn.Module, samples: list[dict], device: torch.device, teacher_iters: int,
                 train_iters: int, progress: bool = False, gt_weight: float = 0.0, init_weight: float = 0.0) -> None:
        from compress.distill import DistillLoss, LossConfig, TeacherTargets
        from compress.distill.config import FeatureLossConfig, OutputLossConfig

        self.samples = samples
        self.device = device
        self.train_iters = train_iters
        output = OutputLossConfig(gt_weight=gt_weight, init_weight=init_weight)
        loss_cfg = LossConfig(feature=FeatureLossConfig(enabled=False), output=output)
        self.loss = DistillLoss(loss_cfg).to(device)
        self.targets = []
        teacher.eval()
        with torch.no_grad():
            for s in progress_bar(samples, desc="teacher targets", disable=not progress, leave=False):
                out = teacher(s["left"][None].to(device), s["right"][None].to(device), iters=teacher_iters,
                              test_mode=True, return_intermediates=True)
                self.targets.append(TeacherTargets.from_output(out, feature_levels=[]).to("cpu"))

    def targets_for(self, idxs: list[int]):
        """The batched teacher targets of samples ``idxs`` on the device."""
        from compress.distill import TeacherTargets

        ts = [self.targets[i] for i in idxs]
        prob = None if ts[0].prob is None else torch.cat([t.prob for t in ts])
        return TeacherTargets(disp=torch.cat([t.disp for t in ts]), prob=prob, prob_scale=ts[0].prob_scale).to(
            self.device
        )

    def loss_of(self, model: nn.Module, idxs: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Distillation loss of ``model`` on samples ``idxs`` (with gradients)."""
        from compress.distill import GroundTruth

        batch = _collate(self.samples, idxs, self.device)
        out = model(batch["left"], batch["right"], iters=self.train_iters, test_mode=False,
                    return_intermediates=True)
        return self.loss(out, self.targets_for(idxs), GroundTruth.from_batch(batch))

    def train(self, model: nn.Module, steps: int, lr: float, batch_size: int = 1, grad_clip: float = 1.0,
              freeze_norm_stats: bool = True, desc: str = "distilling", progress: bool = False) -> float:
        """``steps`` AdamW steps (cosine decay); returns the mean loss of the last quarter of the steps."""
        if steps <= 0:
            return float("nan")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the model has no trainable parameters to distil")
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        was_training = model.training
        model.train()
        if freeze_norm_stats:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        tail: list[float] = []

        def loss_of(batch: tuple[int, list[int]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            i, idxs = batch
            total, parts = self.loss_of(model, idxs)
            if not torch.isfinite(total):
                raise FFSCError(f"the distillation loss became {float(total.detach())} at step {i}; lower distill.lr")
            return total, parts

        def after_step(step: int, total: torch.Tensor, parts: dict[str, torch.Tensor]) -> dict[str, str]:
            if step > steps - max(1, steps // 4):
                tail.append(float(total))
            return {"loss": f"{float(total):.4g}"}

        try:
            fit(params, loss_of, enumerate(_batches(self.samples, batch_size, 0, steps)), opt, sched, steps=steps,
                grad_clip=grad_clip, on_step=after_step, desc=desc, progress=progress, leave=False)
        finally:
            model.train(was_training)
        return sum(tail) / len(tail)


# ------------------------------------------------------------------------------------------ measuring


def measure_cost(model: nn.Module, cfg: PruneConfig, latency: bool) -> dict[str, Any]:
    """MACs and parameters (at the latency size and iterations), and the latency when ``latency``."""
    from compress.latency import measure
    from search_spaces import count_macs

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
                            device=spec.device or (device if spec.backend != "tensorrt" else None), **spec.timing())
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
    from search_spaces import count_macs, count_params

    from .coupling import _meta_copy

    macs: dict[str, int] = {}
    meta = _meta_copy(model, ())
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


def _step_target(kind: str, value: float, cost: dict[str, Any], step_ratio: float,
                 costs: LayerCosts) -> tuple[str, float, LayerCosts]:
    """What one step aims at: the budget, but never more than ``step_ratio`` of the current MACs (or
    parameters) at once. A latency budget is approached through MACs, in proportion to the latency gap."""
    if kind == "mparams":
        return "params", max(value * 1e6, costs.total_params * (1 - step_ratio)), costs
    if kind == "gmacs":
        return "macs", max(value * 1e9, costs.total_macs * (1 - step_ratio)), costs
    gap = value / float(cost["latency"]["median_ms"])
    return "macs", costs.total_macs * max(1 - step_ratio, gap), costs


def _metric(cost: dict[str, Any], kind: str) -> float:
    if kind == "latency_ms":
        return float(cost["latency"]["median_ms"])
    return float(cost[kind])


# ------------------------------------------------------------------------------------------- pruning


def _taylor_loss(distiller: Distiller, cfg: PruneConfig) -> tuple[Callable, list[list[int]]]:
    batches = _batches(distiller.samples, cfg.distill.batch_size, 0, cfg.importance.calibration_batches)
    return (lambda model, idxs: distiller.loss_of(model, idxs)[0]), batches


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
    _check_scope(rules, scope)
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


# -------------------------------------------------------------------------------------------- result


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


def _log(out: Path | None, callbacks: list[Callback], kind: str, step: int, metrics: dict[str, Any]) -> None:
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


def _evaluate(model: nn.Module, distiller: Distiller, n: int, iters: int, device: torch.device) -> dict[str, float]:
    from compress.evaluation import evaluate_student

    n = min(n, len(distiller.samples))
    if n == 0:
        return {}
    disps = [t.disp for t in distiller.targets[:n]]
    return evaluate_student(model, distiller.samples[:n], iters=iters, device=device, teacher_disps=disps)


def _recover_with_recipe(model: nn.Module, cfg: PruneConfig, out: Path) -> tuple[nn.Module, dict[str, Any]]:
    from compress.distill import distill, load_recipe
    from search_spaces import StudentStereo
    from search_spaces.serialization import save_model

    start = save_model(model, out / "recovery_start")
    if isinstance(model, StudentStereo):
        student = ["student.kind=search_space", "student.preset=null", "student.config={}",
                   f"student.init_checkpoint={start}"]
    else:
        student = ["student.kind=factory", "student.preset=null", "student.config={}",
                   "student.factory=search_spaces.serialization:load_model", f"student.config.path={start}",
                   "student.init_checkpoint=null"]
    overrides = [*student, f"run_dir={out / 'recovery'}", f"steps={cfg.distill.recovery_steps}",
                 f"progress={str(cfg.progress).lower()}", *cfg.distill.recipe_overrides]
    result = distill(load_recipe(cfg.distill.recipe, overrides))
    recovered = resolve_model(result.student_path).module.to(next(model.parameters()).device)
    return recovered, {"recipe": cfg.distill.recipe, "run_dir": str(result.run_dir),
                       "train_losses": result.train_losses, "eval": result.eval_metrics}


def prune_to_budget(
    cfg: PruneConfig,
    model: nn.Module | None = None,
    teacher: nn.Module | None = None,
    callbacks: Iterable[Callback] = (),
    samples: list[dict[str, Any]] | None = None,
) -> PruneResult:
    """Run a pruning recipe end to end (see the module docstring); ``model``/``teacher``/``samples`` (as
    :func:`crop_samples` returns them) override the recipe's specs."""
    from search_spaces.serialization import load_model, save_model

    callbacks = list(callbacks)
    kind, value = cfg.budget.kind, cfg.budget.value
    if kind is None:
        raise ConfigError("no budget: set one of budget_ms, budget_gmacs, budget_mparams, ratio")
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.run_dir) if cfg.run_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        # Pruning has no resume: this run starts over. The result file is the seal on the folder (written last, after
        # model/; `ffsc run` reuses a prune by it), so an earlier prune's goes first: a run killed from here on leaves
        # no result beside its own config and partial log, and a half-rewritten model/ is never taken as finished.
        (out / RESULT_NAME).unlink(missing_ok=True)
        (out / LOG_NAME).unlink(missing_ok=True)
        import yaml

        atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    model = (model if model is not None else resolve_model(cfg.model, seed=cfg.seed).module).to(device).eval()
    _check_scope(rules_for(model), cfg.scope)  # before the teacher runs over the data
    if teacher is None:
        teacher = resolve_model(cfg.teacher, seed=cfg.seed).module if cfg.teacher else copy.deepcopy(model)
    teacher = teacher.to(device).eval().requires_grad_(False)
    for p in model.parameters():
        p.requires_grad_(True)
    for prefix in rules_for(model).frozen:
        for name, p in model.named_parameters():
            if name.startswith(prefix + "."):
                p.requires_grad_(False)

    samples = samples if samples is not None else build_samples(cfg)
    teacher_iters = model_iters(teacher, cfg.distill.teacher_iters, key="distill.teacher_iters")
    distiller = Distiller(teacher, samples, device, teacher_iters, cfg.distill.train_iters, progress=cfg.progress,
                          gt_weight=cfg.distill.gt_weight, init_weight=cfg.distill.init_weight)
    # Pruning the teacher itself: scored at the targets' iteration count, so the unpruned model is 0 px from them
    # (at another count it would already differ from itself); any other model at the count it is deployed with.
    eval_iters = teacher_iters if getattr(model, "cfg", None) == getattr(teacher, "cfg", None) else deploy_iters(model)
    time_it = cfg.latency.measure == "always" or (cfg.latency.measure == "budget" and kind == "latency_ms")
    initial = measure_cost(model, cfg, latency=time_it)
    initial["eval"] = _evaluate(model, distiller, cfg.data.eval_samples, eval_iters, device)
    _log(out, callbacks, "baseline", 0, _flat(initial))

    def within(cost: dict[str, Any], fraction: float) -> bool:
        return fraction <= 1 - value + 1e-9 if kind == "ratio" else _metric(cost, kind) <= value

    original: dict[str, int] = {}
    steps: list[StepRecord] = []
    cost, fraction = initial, 1.0
    met = within(cost, fraction) if kind != "ratio" else False
    loss_fn, calib = _taylor_loss(distiller, cfg)
    spec = cfg.latency
    bar = progress_bar(total=cfg.max_steps, desc="pruning", disable=not cfg.progress)
    try:
        for step in range(1, cfg.max_steps + 1):
            if met:
                break
            start = time.perf_counter()
            target = None
            if kind == "ratio":
                upper = max((1 - cfg.step_ratio) ** step, 1 - value)
            else:
                upper = fraction
                iters = model_iters(model, spec.iters, key="latency.iters")
                costs = layer_costs(model, spec.height, spec.width, iters, cost["macs"])
                target = _step_target(kind, value, cost, cfg.step_ratio, costs)
            changed, fraction = prune_step(
                model, upper, cfg.scope, importance=cfg.importance.method, round_to=cfg.round_to,
                global_ranking=cfg.importance.global_ranking, max_ratio=cfg.max_ratio, original=original,
                loss_fn=loss_fn, batches=calib, trace_size=tuple(cfg.trace_size), seed=cfg.seed + step,
                target=target,
            )
            if not changed:
                break  # every in-scope group is at its smallest allowed width
            loss = distiller.train(model, cfg.distill.steps_between, cfg.distill.lr, cfg.distill.batch_size,
                                   cfg.distill.grad_clip, cfg.distill.freeze_norm_stats,
                                   desc=f"distilling after step {step}", progress=cfg.progress)
            model.eval()
            cost = measure_cost(model, cfg, latency=kind == "latency_ms")
            record = StepRecord(
                step=step, keep_fraction=fraction, groups_changed=len(changed), gmacs=cost["gmacs"],
                mparams=cost["mparams"], latency_ms=None if cost["latency"] is None else cost["latency"]["median_ms"],
                distill_loss=None if math.isnan(loss) else loss, seconds=time.perf_counter() - start,
                widths={k: list(v) for k, v in changed.items()},
            )
            steps.append(record)
            _log(out, callbacks, "step", step, {k: v for k, v in asdict(record).items() if k != "widths"})
            shown = {"latency_ms": record.latency_ms, "gmacs": record.gmacs, "mparams": record.mparams,
                     "ratio": 1 - fraction}[kind]
            bar.set_postfix(step=step, **{kind: f"{shown:.4g}"}, loss=f"{loss:.4g}")
            bar.update(1)
            met = within(cost, fraction)
    finally:
        bar.close()

    recovery: dict[str, Any] = {"steps": cfg.distill.recovery_steps}
    recovery["eval_before"] = _evaluate(model, distiller, cfg.data.eval_samples, eval_iters, device)
    if cfg.distill.recipe and cfg.distill.recovery_steps > 0:
        if out is None:
            raise ConfigError("distill.recipe needs an output folder (out) for the trainer's run directory")
        model, info = _recover_with_recipe(model, cfg, out)
        recovery.update(info)
    else:
        recovery["loss"] = distiller.train(
            model, cfg.distill.recovery_steps, cfg.distill.lr, cfg.distill.batch_size, cfg.distill.grad_clip,
            cfg.distill.freeze_norm_stats, desc="recovery", progress=cfg.progress,
        )
    model.eval()
    recovery["eval_after"] = _evaluate(model, distiller, cfg.data.eval_samples, eval_iters, device)
    _log(out, callbacks, "recovery", len(steps), _flat(recovery))
    # Recovery changes weights, not widths: the last measurement stands for the result (timing it again
    # would only add noise), unless latency was asked for and not yet taken at these widths.
    final = {k: v for k, v in cost.items() if k != "eval"}
    if time_it and final.get("latency") is None:
        final = measure_cost(model, cfg, latency=True)
    if kind != "ratio":
        met = _metric(final, kind) <= value
    result = PruneResult(
        budget_kind=kind, budget_value=value, met=met, initial=initial, final=final, steps=steps,
        recovery=recovery, evaluation={"before_recovery": recovery["eval_before"],
                                       "after_recovery": recovery["eval_after"], "unpruned": initial["eval"]},
        config=cfg.to_dict(), model=model,
    )
    if out is not None:
        path = save_model(model, out / MODEL_DIR)
        reloaded = load_model(path, device)
        check_reload(model, reloaded, device)
        result.model_path = str(path)
        atomic_write_text(out / RESULT_NAME, json.dumps(result.to_dict(), indent=2, default=str))
    _log(out, callbacks, "end", len(steps), {"met": met, "steps": len(steps), **_flat(final)})
    if not met:
        warnings.warn(f"budget {kind} <= {value} not met after {len(steps)} steps: reached "
                      f"{_metric(final, kind) if kind != 'ratio' else 1 - fraction:.4g}", stacklevel=2)
    return result


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


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "/"))
        elif isinstance(v, (int, float, bool)) or v is None:
            out[key] = v
    return out
