"""Atomic file output and hashing shared by the export modules."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx

from compress.atomic import atomic_write_bytes, atomic_write_text, sha256_file

__all__ = ["atomic_write_bytes", "atomic_write_text", "sha256_file", "staging_dir"]

# Protobuf cannot serialise a message over 2 GiB; stay well below it before switching to external data.
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@contextmanager
def staging_dir(final_path: str | os.PathLike) -> Iterator[Path]:
    """A private folder beside final_path for multi-file outputs; removed whatever happens."""
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final_path.name}.", suffix=".staging", dir=final_path.parent))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def external_data_name(onnx_name: str) -> str:
    """File name of the weights of a large ONNX model, stored beside it."""
    return f"{onnx_name}.data"


def _initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for init in model.graph.initializer:
        total += len(init.raw_data) + 8 * (len(init.float_data) + len(init.int64_data) + len(init.double_data))
        total += 4 * len(init.int32_data)
    return total


def save_onnx(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Save model at path (external data beside it when too large for one protobuf); returns files written."""
    if _initializer_bytes(model) < _EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path))
        return [path]
    location = external_data_name(path.name)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location)
    return [path.parent / location, path]


def publish(staged: list[Path], destination: Path) -> None:
    """Move staged files into destination's folder, the main file (last) only after its data files."""
    for src in staged:
        os.replace(src, destination.parent / src.name if src != staged[-1] else destination)
