"""End-to-end recipes: teacher -> labels -> search -> prune -> distill -> export (``ffsc run``)."""

from .context import (
    RunContext,
    labels_config,
    prepare_labels,
    prepare_run,
    quiet_third_party,
    search_parent,
    search_space,
    teacher_folder,
    teacher_iters,
    teacher_scores,
)
from .recipe import RunRecipe, load_run_recipe
from .records import ChosenStudent, FrontRow, RunSummary, StageRecord
from .run import run_recipe

__all__ = ["ChosenStudent", "FrontRow", "RunContext", "RunRecipe", "RunSummary", "StageRecord", "labels_config",
           "load_run_recipe", "prepare_labels", "prepare_run", "quiet_third_party", "run_recipe", "search_parent",
           "search_space", "teacher_folder", "teacher_iters", "teacher_scores"]
