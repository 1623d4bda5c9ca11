"""What a run keeps on disk: stage records (a key and an atomic JSON), the typed rows of the summary, wall time."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from compress.atomic import atomic_write_text

WALL_TIME_RECORD = "wall_time.json"


@dataclass(frozen=True)
class StageRecord:
    """One stage's result in the run directory, reused while its key is the one recorded.

    The record is ``{"key": key, ...values}``; ``key_of`` reads the key back from a record another writer made
    (e.g. prune_result.json, whose key is its pruning settings).
    """

    path: Path
    key: Any
    key_of: Callable[[dict[str, Any]], Any] = lambda saved: saved.get("key")

    def load(self) -> dict[str, Any] | None:
        """The saved record when its key matches (None: missing, unreadable or made with another key)."""
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return saved if isinstance(saved, dict) and self.key_of(saved) == self.key else None

    def save(self, **values: Any) -> dict[str, Any]:
        """Write ``{"key": key, **values}`` atomically and return it."""
        saved = {"key": self.key, **values}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(saved, indent=2))
        return saved


@dataclass
class FrontRow:
    """One Pareto-front student in the final table and summary.json."""

    trial: int
    epe_vs_teacher: float | None
    epe_vs_gt: float | None
    iters: int | None
    """The GRU iterations it is scored and its MACs counted at."""
    latency_ms: float | None
    gmacs: float | None
    mparams: float | None
    student_path: str | None
    search_latency_ms: float | None = None
    """The search's latency, when the final table timed the student again side by side (then ``latency_ms``)."""
    latency_iters: int | None = None
    latency_backend: str | None = None
    latency_precision: str | None = None
    latency_mode: str | None = None
    real_epe: float | None = None
    real_bp2: float | None = None

    def timed(self, iters: int | None, backend: str, precision: str, mode: str) -> None:
        """Record how ``latency_ms`` was obtained."""
        self.latency_iters, self.latency_backend, self.latency_precision, self.latency_mode = (
            iters, backend, precision, mode)

    def to_dict(self) -> dict[str, Any]:
        """The row as summary.json has it: the keys of a stage that did not run are left out."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.search_latency_ms is None:
            del out["search_latency_ms"]
        if self.latency_backend is None:
            for key in ("latency_iters", "latency_backend", "latency_precision", "latency_mode"):
                del out[key]
        if self.real_epe is None:
            del out["real_epe"], out["real_bp2"]
        return out


@dataclass
class ChosenStudent:
    """The front student the run finishes (see choose_student)."""

    trial: int
    metrics: dict[str, float]
    config: dict[str, Any] | None
    """Its StudentConfig as a dict (the trial's ``student_config``)."""
    student_path: str | None


@dataclass
class RunSummary:
    """What a run produced (also written to run_dir/summary.json)."""

    run_dir: Path
    teacher: dict[str, Any] = field(default_factory=dict)
    front: list[FrontRow] = field(default_factory=list)
    chosen: ChosenStudent | None = None
    pruned: dict[str, Any] | None = None
    final: dict[str, Any] | None = None
    exports: dict[str, str] = field(default_factory=dict)
    latency_backend: dict[str, Any] = field(default_factory=dict)
    """The backend the run timed on, and why ('auto' resolved on this machine)."""
    latency: dict[str, Any] = field(default_factory=dict)
    """What the table's latencies were timed with (see :func:`latency_settings`); each row also names its own
    ``latency_iters``, ``latency_backend``, ``latency_precision`` and ``latency_mode``."""
    real_pairs: dict[str, Any] = field(default_factory=dict)
    """Scores on labelled real pairs (see :func:`score_real_pairs`); reported, never used to train or choose."""
    seconds: float = 0.0
    """Wall time of this call of ``ffsc run``."""
    seconds_total: float = 0.0
    """Wall time over every call on this run directory (a resume adds to the earlier calls'; see WallTime)."""
    calls: int = 1
    """Calls of ``ffsc run`` on this run directory since it was started (or started over)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values, keys in the order summary.json has always had them."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["front"] = [row.to_dict() for row in self.front]
        out["chosen"] = None if self.chosen is None else asdict(self.chosen)
        return out

    def write(self, path: Path) -> None:
        """Write summary.json (atomically)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, default=str))


@dataclass
class WallTime:
    """The run's wall time over all its calls: earlier calls' seconds are read from run_dir/wall_time.json, and
    this call's are added once when it ends (finished, failed or interrupted)."""

    path: Path
    start: float
    earlier_seconds: float = 0.0
    earlier_calls: int = 0
    ended: dict[str, float] | None = None

    @classmethod
    def open(cls, run_dir: Path, start: float) -> WallTime:
        """The record of ``run_dir`` (zero calls when it has none or it is unreadable), this call started at
        ``start`` (a ``time.perf_counter()`` value)."""
        path = run_dir / WALL_TIME_RECORD
        try:
            saved = json.loads(path.read_text())
            return cls(path, start, float(saved["seconds_total"]), int(saved["calls"]))
        except (OSError, ValueError, KeyError, TypeError):
            return cls(path, start)

    def end(self) -> dict[str, float]:
        """This call's and the total seconds and the number of calls, recorded (atomically) on the first call."""
        if self.ended is None:
            seconds = time.perf_counter() - self.start
            self.ended = {"seconds": seconds, "seconds_total": self.earlier_seconds + seconds,
                          "calls": self.earlier_calls + 1}
            atomic_write_text(self.path, json.dumps(self.ended, indent=2))
        return self.ended
