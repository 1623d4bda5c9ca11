"""One exception type per kind of user mistake; the CLI prints the message and exits non-zero."""

from __future__ import annotations


class FFSCError(Exception):
    """Base class of every error ffsc raises on purpose (never a bug)."""


class CheckpointError(FFSCError):
    """A checkpoint file is missing, unreadable, or does not match the model it should build."""


class ConfigError(FFSCError, ValueError):
    """A config (YAML, dataclass field, search space, recipe) has a wrong or missing value."""


class DataError(FFSCError):
    """Input data (images, disparity files, dataset layouts) is missing or malformed."""


class MissingDependencyError(FFSCError, ImportError):
    """An optional dependency (TensorRT, CUDA) is needed for what was asked and is absent."""


class ExportError(FFSCError):
    """Export or deployment checks failed (ONNX checker, parity, TensorRT support lint)."""
