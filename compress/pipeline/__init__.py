"""End-to-end recipes: teacher -> labels -> search -> prune -> distill -> export (``ffsc run``)."""

from .recipe import RunRecipe, load_run_recipe
from .run import run_recipe

__all__ = ["RunRecipe", "load_run_recipe", "run_recipe"]
