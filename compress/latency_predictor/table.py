"""The per-block latency table: block variants measured once on one backend/device/precision, stored in a JSON
file, summed into a prediction for any config."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from compress.atomic import atomic_write_text
from compress.backends import get_backend
from compress.errors import ConfigError
from compress.latency import check_clock
from compress.latency_config import PRECISIONS, LatencyConfig
from compress.latency_predictor.blocks import (
    BLOCKS,
    OVERHEAD,
    TABLE_FORMAT,
    BlockVariant,
    OverheadProbe,
    block_variants,
    run_blocks,
    space_block_variants,
    student_blocks,
)
from compress.latency_predictor.timing import BlockTiming, time_module
from compress.machine import device_name, machine_info
from compress.terminal import progress_bar
from search_spaces import SearchSpace, StudentConfig, build_student


@dataclass
class TableEntry:
    """A stored measurement: the variant, where it was measured, and its latency."""

    block: str
    fields: dict
    image_shape: list[int]
    backend: str
    device: str
    precision: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    input_shapes: list[list[int]] = field(default_factory=list)
    clock: str = "wall"


def _read_entries(path: Path) -> dict[str, TableEntry]:
    """The entries of a table file, with a clear error for anything else."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"latency table {path} is not readable JSON ({err}); delete it to rebuild") from None
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
        raise ConfigError(f"{path} is not an ffsc latency table (format {TABLE_FORMAT})")
    try:
        return {k: TableEntry(**v) for k, v in data.get("entries", {}).items()}
    except TypeError as err:
        raise ConfigError(f"latency table {path} has malformed entries ({err}); delete it to rebuild") from None


class LatencyTable:
    """Block latencies on one backend/device/precision, cached in a JSON file (several tables may share one).

    ``device`` is where blocks run ("cpu", "cuda"); entries are keyed by the hardware's name, so a file
    copied to another machine does not serve its numbers there. ``clock="thread"`` times single-threaded
    CPU runs by thread CPU time (see compress.latency.measure), steadier on cores shared with other work.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        backend: str = "onnxruntime",
        device: str = "cpu",
        precision: str = "fp32",
        threads: int | None = None,
        warmup: int = 3,
        repeats: int = 15,
        clock: str = "wall",
    ) -> None:
        runner = get_backend(backend)
        if precision not in PRECISIONS:
            raise ConfigError(f"unknown precision '{precision}'; valid: {', '.join(PRECISIONS)}")
        if warmup < 0 or repeats < 1:
            raise ConfigError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
        self.path = Path(path) if path is not None else None
        self.backend, self.precision, self.threads = backend, precision, threads
        self.device = torch.device(device)
        self.warmup, self.repeats = warmup, repeats
        if runner.own_threads and self.device.type == "cpu":
            self.threads = runner.threads(threads)  # torch times with its current setting; name it in the key
        check_clock(clock, self.device, self.threads)
        self.clock = clock
        self.hardware = device_name(self.device, self.threads)
        self.entries: dict[str, TableEntry] = {}
        if self.path is not None and self.path.is_file():
            self._load(self.path)

    # --- storage -------------------------------------------------------------------------------------
    def _load(self, path: Path) -> None:
        self.entries = _read_entries(path)

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write every entry (all backends/devices held) to JSON atomically; returns the path."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ConfigError("no path to save the latency table to; pass one")
        if target.is_file():  # runs sharing the file keep each other's entries (theirs first, ours win)
            self.entries = {**_read_entries(target), **self.entries}
        data = {"format": TABLE_FORMAT, "machine": machine_info(),
                "entries": {k: asdict(v) for k, v in sorted(self.entries.items())}}
        atomic_write_text(target, json.dumps(data, indent=1, sort_keys=True) + "\n")
        return target

    @classmethod
    def load(cls, path: str | os.PathLike, **settings) -> LatencyTable:
        """A table reading (and later saving to) an existing file; settings as for the constructor."""
        if not Path(path).is_file():
            raise ConfigError(f"latency table {path} does not exist")
        return cls(path, **settings)

    def __len__(self) -> int:
        return sum(1 for e in self.entries.values() if self._mine(e))

    def _mine(self, entry: TableEntry) -> bool:
        mine = (self.backend, self.hardware, self.precision, self.clock)
        return (entry.backend, entry.device, entry.precision, entry.clock) == mine

    # --- keys ----------------------------------------------------------------------------------------
    def key(self, variant: BlockVariant) -> str:
        """Cache key: block, fields, image shape, backend, device (hardware name) and precision."""
        payload = {"variant": json.loads(variant.identity()), "backend": self.backend, "device": self.hardware,
                   "precision": self.precision}
        if self.clock != "wall":
            payload["clock"] = self.clock
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]

    def _overhead_variant(self, batch: int = 1) -> BlockVariant:
        return BlockVariant(OVERHEAD, {}, (batch, 1, 8, 8))

    def overhead_ms(self, batch: int = 1) -> float:
        """The stored per-call overhead (0 when not measured yet)."""
        return self.lookup(self._overhead_variant(batch)) or 0.0

    def lookup(self, variant: BlockVariant) -> float | None:
        """Stored median milliseconds of a variant, or None."""
        entry = self.entries.get(self.key(variant))
        return None if entry is None else entry.median_ms

    def missing(self, cfg: StudentConfig, height: int, width: int, batch: int = 1) -> list[BlockVariant]:
        """The config's block variants not yet in the table."""
        return [v for v in block_variants(cfg, height, width, batch) if self.lookup(v) is None]

    # --- measuring -----------------------------------------------------------------------------------
    def _store(self, variant: BlockVariant, timing: BlockTiming, input_shapes: list[list[int]]) -> None:
        self.entries[self.key(variant)] = TableEntry(
            block=variant.block, fields=variant.fields, image_shape=list(variant.image_shape), backend=self.backend,
            device=self.hardware, precision=self.precision, median_ms=timing.median_ms, p10_ms=timing.p10_ms,
            p90_ms=timing.p90_ms, repeats=timing.repeats, input_shapes=input_shapes, clock=self.clock)

    def _time(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> BlockTiming:
        return time_module(module, inputs, self.backend, self.device, self.precision, self.warmup, self.repeats,
                           self.threads, self.clock)

    def measure_overhead(self, batch: int = 1) -> float:
        """Measure (once) and return the per-call overhead of this backend."""
        variant = self._overhead_variant(batch)
        if (hit := self.lookup(variant)) is not None:
            return hit
        x = torch.zeros(variant.image_shape)
        self._store(variant, self._time(OverheadProbe(), (x,)), [list(x.shape)])
        return self.lookup(variant)

    def measure_config(
        self, cfg: StudentConfig, height: int, width: int, batch: int = 1, only: Iterable[str] | None = None,
        seed: int = 0,
    ) -> int:
        """Measure the config's block variants that the table lacks (or only the named blocks); returns how many."""
        wanted = {v.block: v for v in self.missing(cfg, height, width, batch)}
        if only is not None:
            wanted = {b: v for b, v in wanted.items() if b in set(only)}
        if not wanted:
            return 0
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            student = build_student(cfg).eval()
            left, right = (torch.rand(batch, 3, height, width) * 255.0 for _ in range(2))
        # One real forward gives every block realistic inputs (shapes and value ranges).
        _, inputs = run_blocks(student_blocks(student), left, right, iters=1)
        blocks = student_blocks(student)
        for name, variant in wanted.items():
            args = inputs[name]
            self._store(variant, self._time(blocks[name], args), [list(t.shape) for t in args])
        self.measure_overhead(batch)
        return len(wanted)

    def build(
        self,
        space: SearchSpace,
        height: int,
        width: int,
        batch: int = 1,
        configs: Iterable[StudentConfig] | None = None,
        progress: bool = True,
        save_every: int = 10,
    ) -> int:
        """Measure every block variant the space can produce (or those of the given configs) not yet stored.

        Saves to the table's path every ``save_every`` configs, so an interrupted build keeps its work.
        Returns the number of variants measured.
        """
        if configs is None:
            todo = list(space_block_variants(space, height, width, batch).values())
        else:
            todo = [(v, cfg) for cfg in configs for v in block_variants(cfg, height, width, batch)]
        # Group the missing variants by the config that carries them: one student build per config.
        by_config: dict[str, tuple[StudentConfig, set[str]]] = {}
        seen: set[str] = set()
        for variant, cfg in todo:
            key = self.key(variant)
            if key in seen or key in self.entries:
                continue
            seen.add(key)
            by_config.setdefault(cfg.to_json(), (cfg, set()))[1].add(variant.block)
        measured = 0
        bar = progress_bar(by_config.values(), desc="latency table", unit="config", disable=not progress)
        for i, (cfg, blocks) in enumerate(bar, start=1):
            measured += self.measure_config(cfg, height, width, batch, only=blocks)
            if self.path is not None and i % save_every == 0:
                self.save()
        self.measure_overhead(batch)
        if self.path is not None:
            self.save()
        return measured

    # --- predicting ----------------------------------------------------------------------------------
    def breakdown(self, cfg: StudentConfig, height: int, width: int, iters: int | None = None,
                  batch: int = 1) -> dict[str, float]:
        """Per-block milliseconds of one forward (the GRU iteration multiplied by iters) and the overhead term."""
        iters = cfg.iters if iters is None else iters
        out: dict[str, float] = {}
        for variant in block_variants(cfg, height, width, batch):
            ms = self.lookup(variant)
            if ms is None:
                raise ConfigError(f"block {variant.block} of {cfg.name} ({variant.fields}) at "
                                  f"{height}x{width} is not in the latency table for {self.backend} on "
                                  f"{self.hardware}; measure it with table.measure_config(cfg, ...) or "
                                  "table.build(space, ...)")
            out[variant.block] = ms * (iters if variant.block == "gru_iteration" else 1)
        overhead = self.overhead_ms(batch)
        # Timed separately, each block paid one call overhead; the whole model pays it once.
        out[OVERHEAD] = -overhead * (len(BLOCKS) - 2 + iters)
        return out

    def predict(self, cfg: StudentConfig, height: int, width: int, iters: int | None = None, batch: int = 1,
                measure_missing: bool = False) -> float:
        """Predicted milliseconds of one forward of cfg (iters GRU iterations, default cfg.iters)."""
        if measure_missing:
            self.measure_config(cfg, height, width, batch)
        return max(sum(self.breakdown(cfg, height, width, iters, batch).values()), 0.0)


def default_table_path() -> Path:
    """The user's latency-table file ($FFSC_CACHE_DIR, else ~/.cache/ffsc): one per machine, shared by every run,
    since its entries are keyed by block, image size, backend, hardware, precision and clock."""
    root = Path(os.environ.get("FFSC_CACHE_DIR") or Path.home() / ".cache" / "ffsc")
    return root / "latency_table.json"


def open_table(lat: LatencyConfig) -> LatencyTable:
    """The per-block table for a (resolved) LatencyConfig, read from its file when it exists."""
    if lat.backend == "auto":
        raise ConfigError("resolve latency.backend 'auto' (LatencyConfig.resolved) before opening a table")
    timing, table = lat.timing_config(), lat.predictor_config().table
    return LatencyTable(Path(table) if table else default_table_path(), backend=timing.backend,
                        device=timing.run_device(), precision=timing.precision, threads=timing.threads,
                        warmup=timing.warmup, repeats=timing.repeats, clock=timing.clock)


def predict_latency(table: LatencyTable, cfg: StudentConfig, height: int, width: int,
                    iters: int | None = None) -> float:
    """Predicted milliseconds of cfg, measuring (and saving) any block variant the table lacks first."""
    if table.measure_config(cfg, height, width) and table.path is not None:
        table.save()
    return table.predict(cfg, height, width, iters=iters)
