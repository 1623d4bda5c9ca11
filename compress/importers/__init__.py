"""Importers: checkpoints released by other projects, turned into ordinary ffsc models."""

from .fast_foundationstereo import import_fast_foundationstereo

__all__ = ["import_fast_foundationstereo"]
