"""The cross-process latency cache: what a number is (LatencyStats), the identity of a model, the key of a
measurement, and the SQLite file they are stored in.

Model identity: an nn.Module hashes to sha256 over its class (module + qualified name), repr() of its `cfg` or
`config` attribute when it has one, and every state-dict entry's name, dtype, shape and bytes; so two modules with
equal config and weights share cache entries and any weight change misses. A file (.onnx, .engine) hashes to the
sha256 of its bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from compress.export._files import sha256_file


@dataclass
class LatencyStats:
    """Latency of one forward (all iterations) in milliseconds, over `repeats` timed runs."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    repeats: int
    backend: str
    device: str
    precision: str
    shapes: dict[str, list[int]]
    iters: int
    model_hash: str
    options: dict = field(default_factory=dict)
    """Settings that change the number but not the model: compile, cuda_graph, threads."""
    round_medians_ms: list[float] = field(default_factory=list)
    """Per-round medians when pooled by :func:`measure_together` (empty for one measure())."""

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LatencyStats:
        """Inverse of to_dict."""
        return cls(**data)


def model_hash(model_or_path: nn.Module | str | os.PathLike) -> str:
    """Identity of a model for caching (see the module docstring for what goes in)."""
    if not isinstance(model_or_path, nn.Module):
        return sha256_file(model_or_path)
    model = getattr(model_or_path, "_orig_mod", model_or_path)  # a torch.compile wrapper times its original
    digest = hashlib.sha256()
    digest.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    config = getattr(model, "cfg", getattr(model, "config", None))
    if config is not None:
        digest.update(repr(config).encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def latency_key(
    model_hash: str, backend: str, device: str, shapes: dict[str, list[int]], precision: str, iters: int,
    options: dict | None = None,
) -> str:
    """Cache key: everything that changes a latency number."""
    payload = {"model": model_hash, "backend": backend, "device": device, "shapes": shapes,
               "precision": precision, "iters": iters, "options": options or {}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class LatencyCache:
    """Latency results in a SQLite file, safe for concurrent processes (SQLite's own locking)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS latency (key TEXT PRIMARY KEY, stats TEXT NOT NULL, "
                       "created REAL NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        # One short-lived connection per call: nothing held across processes or threads.
        return sqlite3.connect(self.path, timeout=60.0)

    def get(self, key: str) -> LatencyStats | None:
        """Stored stats for key, or None."""
        with self._connect() as db:
            row = db.execute("SELECT stats FROM latency WHERE key = ?", (key,)).fetchone()
        return None if row is None else LatencyStats.from_dict(json.loads(row[0]))

    def put(self, key: str, stats: LatencyStats) -> None:
        """Store (or replace) stats under key."""
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO latency (key, stats, created) VALUES (?, ?, ?)",
                       (key, json.dumps(stats.to_dict(), sort_keys=True), time.time()))

    def __len__(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM latency").fetchone()[0])
