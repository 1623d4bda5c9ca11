"""Helpers shared by the subcommands (the library's own helpers live below compress/commands)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from compress.terminal import console

__all__ = ["console", "recipe_from_args"]


def recipe_from_args(args: argparse.Namespace, load) -> Any:
    """``load(path, overrides)`` on the command's recipe argument, read as the first override when it is one."""
    recipe_path = args.recipe
    overrides = list(args.overrides)
    if recipe_path and "=" in recipe_path and not Path(recipe_path).is_file():
        overrides.insert(0, recipe_path)
        recipe_path = None
    return load(recipe_path, overrides)
