"""Prune to a budget: prune a step -> distil briefly -> measure, until the budget is met; then recover.

The budget is a median latency on a chosen backend (``compress.latency.measure``), MACs or parameters
(``search_spaces.counting``), or a fraction of channels. Each step re-traces the model, ranks the in-scope
channels (``importance``), keeps ``(1 - step_ratio) ** k`` of the original widths and distils against the
teacher for a few steps; a final recovery distillation follows. The result is saved as a student (or pruned
teacher) folder with ``prune_result.json`` beside it: the budget, whether and how it was met (backend,
device, shapes, precision, iterations, timing statistics), every step, and the agreement with the teacher.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from compress.atomic import atomic_write_text
from compress.device import pick_device
from compress.errors import ConfigError
from compress.models import resolve_model
from compress.terminal import progress_bar
from search_spaces.serialization import load_model, save_model
from teacher import model_iters

from .config import PruneConfig
from .cost import budget_metric, layer_costs, measure_cost, step_target
from .coupling import rules_for
from .recovery import Distiller, evaluate_on_targets, recover_with_recipe
from .report import (
    LOG_NAME,
    MODEL_DIR,
    RESULT_NAME,
    Callback,
    PruneResult,
    StepRecord,
    check_reload,
    flatten_metrics,
    log_event,
)
from .samples import build_samples, index_batches
from .step import check_scope, prune_step


def deploy_iters(model: nn.Module) -> int:
    """The GRU iteration count a model is deployed with (student ``iters``, teacher ``valid_iters``)."""
    return model_iters(model)  # the one rule, shared with the pipeline, labelling and inference


def _taylor_loss(distiller: Distiller, cfg: PruneConfig) -> tuple[Callable, list[list[int]]]:
    batches = index_batches(distiller.samples, cfg.distill.batch_size, 0, cfg.importance.calibration_batches)
    return (lambda model, idxs: distiller.loss_of(model, idxs)[0]), batches


def resolve_prune_models(cfg: PruneConfig, model: nn.Module | None = None, teacher: nn.Module | None = None
                         ) -> tuple[nn.Module, nn.Module]:
    """The model to prune and its teacher (given ones kept; the unpruned model itself when the recipe names no
    teacher), with the scope checked against the model's family; nothing is written."""
    if model is None:
        model = resolve_model(cfg.model, seed=cfg.seed, key="--model").module
    check_scope(rules_for(model), cfg.scope)  # before the teacher is loaded and runs over the data
    if teacher is None:
        spec = cfg.teacher
        teacher = (resolve_model(spec.checkpoint, config=spec.architecture(), trust_checkpoint=spec.trust_checkpoint,
                                 seed=cfg.seed, key="--teacher").module if spec.checkpoint else copy.deepcopy(model))
    return model, teacher


def prune_to_budget(
    cfg: PruneConfig,
    model: nn.Module | None = None,
    teacher: nn.Module | None = None,
    callbacks: Iterable[Callback] = (),
    samples: list[dict[str, Any]] | None = None,
) -> PruneResult:
    """Run a pruning recipe end to end (see the module docstring); ``model``/``teacher``/``samples`` (as
    :func:`crop_samples` returns them) override the recipe's specs."""
    callbacks = list(callbacks)
    kind, value = cfg.budget.kind, cfg.budget.value
    if kind is None:
        raise ConfigError("no budget: set one of budget_ms, budget_gmacs, budget_mparams, ratio")
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    # Everything that can refuse the run is resolved before the folder is touched: a failed prune leaves an
    # earlier one's files as they were.
    model, teacher = resolve_prune_models(cfg, model, teacher)
    out = Path(cfg.run_dir) if cfg.run_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        # Pruning has no resume: this run starts over. The result file is the seal on the folder (written last, after
        # model/; `ffsc run` reuses a prune by it), so an earlier prune's goes first: a run killed from here on leaves
        # no result beside its own config and partial log, and a half-rewritten model/ is never taken as finished.
        (out / RESULT_NAME).unlink(missing_ok=True)
        (out / LOG_NAME).unlink(missing_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    model = model.to(device).eval()
    teacher = teacher.to(device).eval().requires_grad_(False)
    for p in model.parameters():
        p.requires_grad_(True)
    for prefix in rules_for(model).frozen:
        for name, p in model.named_parameters():
            if name.startswith(prefix + "."):
                p.requires_grad_(False)

    samples = samples if samples is not None else build_samples(cfg)
    teacher_iters = model_iters(teacher, cfg.teacher.iters, key="teacher.iters")
    distiller = Distiller(teacher, samples, device, teacher_iters, cfg.distill.train_iters, progress=cfg.progress,
                          gt_weight=cfg.distill.gt_weight, init_weight=cfg.distill.init_weight)
    # Pruning the teacher itself: scored at the targets' iteration count, so the unpruned model is 0 px from them
    # (at another count it would already differ from itself); any other model at the count it is deployed with.
    eval_iters = teacher_iters if getattr(model, "cfg", None) == getattr(teacher, "cfg", None) else deploy_iters(model)
    time_it = cfg.latency.measure == "always" or (cfg.latency.measure == "budget" and kind == "latency_ms")
    initial = measure_cost(model, cfg, latency=time_it)
    initial["eval"] = evaluate_on_targets(model, distiller, cfg.data.eval_samples, eval_iters, device)
    log_event(out, callbacks, "baseline", 0, flatten_metrics(initial))

    def within(cost: dict[str, Any], fraction: float) -> bool:
        return fraction <= 1 - value + 1e-9 if kind == "ratio" else budget_metric(cost, kind) <= value

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
                target = step_target(kind, value, cost, cfg.step_ratio, costs)
            changed, fraction = prune_step(
                model, upper, cfg.scope, importance=cfg.importance.method, round_to=cfg.round_to,
                global_ranking=cfg.importance.global_ranking, max_ratio=cfg.max_ratio, original=original,
                loss_fn=loss_fn, batches=calib, trace_size=tuple(cfg.trace_size), seed=cfg.seed + step,
                target=target,
            )
            if not changed:
                break  # every in-scope group is at its smallest allowed width
            loss = distiller.train(model, cfg.distill.steps_between, cfg.distill.optim, cfg.distill.batch_size,
                                   cfg.distill.freeze_norm_stats, desc=f"distilling after step {step}",
                                   progress=cfg.progress)
            model.eval()
            cost = measure_cost(model, cfg, latency=kind == "latency_ms")
            record = StepRecord(
                step=step, keep_fraction=fraction, groups_changed=len(changed), gmacs=cost["gmacs"],
                mparams=cost["mparams"], latency_ms=None if cost["latency"] is None else cost["latency"]["median_ms"],
                distill_loss=None if math.isnan(loss) else loss, seconds=time.perf_counter() - start,
                widths={k: list(v) for k, v in changed.items()},
            )
            steps.append(record)
            log_event(out, callbacks, "step", step, {k: v for k, v in asdict(record).items() if k != "widths"})
            shown = {"latency_ms": record.latency_ms, "gmacs": record.gmacs, "mparams": record.mparams,
                     "ratio": 1 - fraction}[kind]
            bar.set_postfix(step=step, **{kind: f"{shown:.4g}"}, loss=f"{loss:.4g}")
            bar.update(1)
            met = within(cost, fraction)
    finally:
        bar.close()

    recovery: dict[str, Any] = {"steps": cfg.distill.recovery_steps}
    recovery["eval_before"] = evaluate_on_targets(model, distiller, cfg.data.eval_samples, eval_iters, device)
    if cfg.distill.recipe and cfg.distill.recovery_steps > 0:
        if out is None:
            raise ConfigError("distill.recipe needs an output folder (out) for the trainer's run directory")
        model, info = recover_with_recipe(model, cfg, out)
        recovery.update(info)
    else:
        recovery["loss"] = distiller.train(
            model, cfg.distill.recovery_steps, cfg.distill.optim, cfg.distill.batch_size, cfg.distill.freeze_norm_stats,
            desc="recovery", progress=cfg.progress,
        )
    model.eval()
    recovery["eval_after"] = evaluate_on_targets(model, distiller, cfg.data.eval_samples, eval_iters, device)
    log_event(out, callbacks, "recovery", len(steps), flatten_metrics(recovery))
    # Recovery changes weights, not widths: the last measurement stands for the result (timing it again
    # would only add noise), unless latency was asked for and not yet taken at these widths.
    final = {k: v for k, v in cost.items() if k != "eval"}
    if time_it and final.get("latency") is None:
        final = measure_cost(model, cfg, latency=True)
    if kind != "ratio":
        met = budget_metric(final, kind) <= value
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
    log_event(out, callbacks, "end", len(steps), {"met": met, "steps": len(steps), **flatten_metrics(final)})
    if not met:
        warnings.warn(f"budget {kind} <= {value} not met after {len(steps)} steps: reached "
                      f"{budget_metric(final, kind) if kind != 'ratio' else 1 - fraction:.4g}", stacklevel=2)
    return result
