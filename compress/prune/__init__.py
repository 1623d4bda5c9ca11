"""Structured pruning of FoundationStereo-family models to a latency, MAC or parameter budget.

``trace`` (torch-pruning's dependency graph, traced on a meta copy and repaired), ``coupling`` (which channels
move together: that graph cut into groups by the rules the model's family declares, ``compress.pruning_rules``),
``importance`` (which channels to remove: magnitude, Taylor, random; per-group or global ranking), ``step`` (one
pruning step), ``samples`` (the cropped calibration pairs), ``recovery`` (distillation against the teacher),
``cost`` (MACs, parameters, latency), ``report`` (``prune_result.json``, the log) and ``budget`` (the iterative
prune -> distil -> measure loop and the final recovery) are apart, as in Torch-Pruning. Pruned models save as
students (or pruned teachers) that reload without this package.
"""

from search_spaces.serialization import load_model, load_pruned_teacher, save_model, save_pruned_teacher

from .budget import prune_to_budget, resolve_prune_models
from .config import (
    DataSpec,
    DistillSpec,
    ImportanceConfig,
    PruneConfig,
    PruneSettings,
    load_prune_config,
)
from .cost import measure_cost
from .coupling import ChannelGroup, Coupling, analyze, apply_plan, rules_for
from .importance import METHODS, group_scores, plan_removals
from .recovery import Distiller
from .report import Callback, PruneResult, StepRecord, tracker_callback
from .samples import build_samples, crop_samples
from .step import prune_once, prune_step

__all__ = [
    "METHODS",
    "Callback",
    "ChannelGroup",
    "Coupling",
    "DataSpec",
    "DistillSpec",
    "Distiller",
    "ImportanceConfig",
    "PruneConfig",
    "PruneSettings",
    "PruneResult",
    "StepRecord",
    "analyze",
    "apply_plan",
    "build_samples",
    "group_scores",
    "crop_samples",
    "load_model",
    "load_prune_config",
    "load_pruned_teacher",
    "measure_cost",
    "plan_removals",
    "prune_once",
    "prune_step",
    "prune_to_budget",
    "resolve_prune_models",
    "rules_for",
    "save_model",
    "save_pruned_teacher",
    "tracker_callback",
]
