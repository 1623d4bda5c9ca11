"""End-to-end recipes: teacher -> labels -> search -> prune -> distill -> export (``ffsc run``)."""

from .recipe import RunRecipe, load_run_recipe
from .run import labels_config, run_recipe

__all__ = ["RunRecipe", "labels_config", "load_run_recipe", "run_recipe"]
