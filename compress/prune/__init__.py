"""Structured pruning of FoundationStereo-family models to a latency, MAC or parameter budget.

``coupling`` (which channels move together: torch-pruning's dependency graph plus the family's rules),
``importance`` (which channels to remove: magnitude, Taylor, random; per-group or global ranking) and
``budget`` (the iterative prune -> distil -> measure loop and the final recovery) are apart, as in
Torch-Pruning. Pruned models save as students (or pruned teachers) that reload without this package.
"""

from search_spaces.serialization import load_model, load_pruned_teacher, save_model, save_pruned_teacher

from .budget import (
    Callback,
    Distiller,
    PruneResult,
    StepRecord,
    build_samples,
    crop_samples,
    measure_cost,
    prune_once,
    prune_step,
    prune_to_budget,
    tracker_callback,
)
from .config import (
    DataSpec,
    DistillSpec,
    ImportanceConfig,
    PruneConfig,
    PruneSettings,
    load_prune_config,
)
from .coupling import PARTS, ChannelGroup, Coupling, FamilyRules, analyze, apply_plan, rules_for
from .importance import METHODS, group_scores, plan_removals

__all__ = [
    "METHODS",
    "PARTS",
    "Callback",
    "ChannelGroup",
    "Coupling",
    "DataSpec",
    "DistillSpec",
    "Distiller",
    "FamilyRules",
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
    "rules_for",
    "save_model",
    "save_pruned_teacher",
    "tracker_callback",
]
