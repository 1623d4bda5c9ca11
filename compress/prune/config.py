"""Typed configuration of a pruning run; a recipe is YAML merged over these dataclasses by OmegaConf.

``load_prune_config(path, ["key=value", ...])`` type-checks every key (unknown keys and wrong types are errors)
and returns a plain :class:`PruneConfig`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.errors import ConfigError

from .coupling import PARTS
from .importance import METHODS

BUDGET_KINDS = ("latency_ms", "gmacs", "mparams", "ratio")
MEASURE_MODES = ("budget", "always", "never")


def _size(name: str, value: list[int] | None) -> None:
    if value is not None and (len(value) != 2 or any(int(v) <= 0 or int(v) % 32 for v in value)):
        raise ConfigError(f"{name}: got {list(value)}, expected [height, width], both positive multiples of 32")


@dataclass
class BudgetConfig:
    """What to prune down to: exactly one of these is set."""

    latency_ms: float | None = None
    """Median latency of one forward (all GRU iterations) on the ``latency`` settings."""
    gmacs: float | None = None
    """MACs of one forward at ``latency.height`` x ``latency.width``, in units of 1e9."""
    mparams: float | None = None
    """Parameters, in millions."""
    ratio: float | None = None
    """Fraction of the in-scope channels to remove (no measurement)."""

    def __post_init__(self) -> None:
        set_ = [k for k in BUDGET_KINDS if getattr(self, k) is not None]
        if len(set_) > 1:
            raise ConfigError(f"budget: got {', '.join(set_)}; set exactly one of {', '.join(BUDGET_KINDS)}")
        for key in set_:
            if getattr(self, key) <= 0:
                raise ConfigError(f"budget.{key}: got {getattr(self, key)}, expected a positive number")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise ConfigError(f"budget.ratio: got {self.ratio}, expected a fraction between 0 and 1")

    @property
    def kind(self) -> str | None:
        """The budget that is set (None when none is)."""
        return next((k for k in BUDGET_KINDS if getattr(self, k) is not None), None)

    @property
    def value(self) -> float | None:
        """Its value."""
        kind = self.kind
        return None if kind is None else float(getattr(self, kind))


@dataclass
class LatencySpec:
    """How latency is measured (see compress.latency.measure) and the input size MACs are counted at."""

    backend: str = "onnxruntime"
    """torch | onnxruntime | tensorrt."""
    device: str | None = None
    """None = cuda when available (always for tensorrt), else cpu."""
    precision: str = "fp32"
    height: int = 480
    width: int = 640
    iters: int | None = None
    """GRU iterations of the timed forward; None = the model's deployment count (student iters, teacher
    valid_iters)."""
    warmup: int = 3
    repeats: int = 10
    threads: int | None = None
    """ONNX Runtime intra-op threads (None = its default)."""
    measure: str = "budget"
    """When to time: 'budget' (only for a latency budget), 'always' (also before/after other budgets), 'never'."""

    def __post_init__(self) -> None:
        from compress.latency import BACKENDS, PRECISIONS

        if self.backend not in BACKENDS:
            raise ConfigError(f"latency.backend: got {self.backend!r}, expected one of {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"latency.precision: got {self.precision!r}, expected one of {', '.join(PRECISIONS)}")
        _size("latency [height, width]", [self.height, self.width])
        if self.iters is not None and self.iters < 1:
            raise ConfigError(f"latency.iters: got {self.iters}, expected >= 1 or null")
        if self.warmup < 0 or self.repeats < 1:
            raise ConfigError(f"latency.warmup/repeats: got {self.warmup}/{self.repeats}, expected >= 0 / >= 1")
        if self.measure not in MEASURE_MODES:
            raise ConfigError(f"latency.measure: got {self.measure!r}, expected one of {', '.join(MEASURE_MODES)}")


@dataclass
class ImportanceConfig:
    """How channels are ranked."""

    method: str = "taylor"
    """taylor (gradients of the distillation loss) | magnitude | random (baseline)."""
    global_ranking: bool = True
    """Rank channels of all in-scope groups together (False: every group loses the same fraction)."""
    calibration_batches: int = 4
    """Batches whose distillation-loss gradients the Taylor scores sum over."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"importance.method: got {self.method!r}, expected one of {', '.join(METHODS)}")
        if self.calibration_batches < 1:
            raise ConfigError(f"importance.calibration_batches: got {self.calibration_batches}, expected >= 1")


@dataclass
class DataSpec:
    """Calibration and distillation images: a dataset folder, or synthetic pairs when ``path`` is null."""

    path: str | None = None
    kind: str = "auto"
    """Reader name for ``path`` (auto = detect the layout)."""
    num_samples: int = 8
    """Samples used (synthetic: generated; folder: the first ones)."""
    size: list[int] | None = None
    """[height, width] centre crop (multiples of 32); null = each image rounded down to multiples of 32
    (synthetic: 64 x 128)."""
    eval_samples: int = 2
    """Samples (from the same set) the EPE against the teacher is reported on."""

    def __post_init__(self) -> None:
        _size("data.size", self.size)
        if self.num_samples < 1 or self.eval_samples < 0:
            raise ConfigError(f"data.num_samples/eval_samples: got {self.num_samples}/{self.eval_samples}, "
                              "expected >= 1 / >= 0")


@dataclass
class DistillSpec:
    """Distillation between pruning steps and after the last one (recovery), against the teacher."""

    steps_between: int = 20
    recovery_steps: int = 200
    lr: float = 1e-4
    batch_size: int = 1
    train_iters: int = 4
    """Student GRU iterations while distilling."""
    teacher_iters: int | None = None
    """Teacher GRU iterations for the targets; None = the teacher's deployment count."""
    grad_clip: float = 1.0
    gt_weight: float = 0.0
    """Weight of the smooth-L1 to ground truth where a sample has it (0 = distillation only)."""
    init_weight: float = 0.0
    """Weight of the initial (cost-volume) disparity's smooth-L1 to the teacher's final disparity."""
    freeze_norm_stats: bool = True
    """Keep batch-norm running statistics fixed (small distillation batches would make them noisy)."""
    recipe: str | None = None
    """A ``compress.distill`` recipe to run as the recovery instead of the built-in loop (full trainer:
    label cache, DDP, checkpoints); the pruned model is its starting point."""
    recipe_overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.steps_between < 0 or self.recovery_steps < 0:
            raise ConfigError(f"distill.steps_between/recovery_steps: got {self.steps_between}/"
                              f"{self.recovery_steps}, expected >= 0")
        if self.lr <= 0 or self.batch_size < 1 or self.train_iters < 1 or self.grad_clip <= 0:
            raise ConfigError("distill.lr, batch_size, train_iters and grad_clip must be positive")
        if self.gt_weight < 0 or self.init_weight < 0:
            raise ConfigError(f"distill.gt_weight/init_weight: got {self.gt_weight}/{self.init_weight}, "
                              "expected >= 0")


@dataclass
class PruneConfig:
    """A whole pruning run (``ffsc prune``)."""

    model: str = "preset:fast_foundationstereo"
    """A saved student or pruned-teacher folder, an official teacher checkpoint (cfg.yaml beside it), or
    preset:NAME (a randomly initialised student preset)."""
    teacher: str | None = None
    """Distillation teacher (same forms); None = the unpruned model itself."""
    out: str = "runs/prune"
    scope: list[str] = field(default_factory=lambda: ["refinement"])
    """Parts to prune: backbone, cost_filtering, refinement (teachers: refinement only)."""
    round_to: int = 8
    """Pruned widths are multiples of this (tensor cores stay fed)."""
    step_ratio: float = 0.2
    """Each step keeps (1 - step_ratio) of the previous target width (relative to the original widths)."""
    max_steps: int = 10
    max_ratio: float = 0.9
    """No group loses more than this fraction of its original width."""
    seed: int = 0
    device: str | None = None
    """Where pruning and distillation run; None = cuda when available, else cpu."""
    progress: bool = True
    trace_size: list[int] = field(default_factory=lambda: [32, 64])
    """[height, width] of the (meta-device) forward that builds the dependency graph."""
    mlflow: bool = True
    """Log the run to MLflow (``ffsc prune``): config as params, every step's metrics, the result file."""
    tracking_uri: str | None = None
    """MLflow tracking URI; None = a SQLite store ``mlflow.db`` in the output folder."""
    experiment: str = "ffsc"
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    latency: LatencySpec = field(default_factory=LatencySpec)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    data: DataSpec = field(default_factory=DataSpec)
    distill: DistillSpec = field(default_factory=DistillSpec)

    def __post_init__(self) -> None:
        unknown = [p for p in self.scope if p not in PARTS]
        if unknown or not self.scope:
            raise ConfigError(f"scope: got {list(self.scope)}, expected a non-empty list of {', '.join(PARTS)}")
        if self.round_to < 1:
            raise ConfigError(f"round_to: got {self.round_to}, expected >= 1")
        if not 0 < self.step_ratio < 1:
            raise ConfigError(f"step_ratio: got {self.step_ratio}, expected a fraction between 0 and 1")
        if not 0 < self.max_ratio < 1:
            raise ConfigError(f"max_ratio: got {self.max_ratio}, expected a fraction between 0 and 1")
        if self.max_steps < 1:
            raise ConfigError(f"max_steps: got {self.max_steps}, expected >= 1")
        _size("trace_size", self.trace_size)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML, JSON, MLflow params)."""
        return dataclasses.asdict(self)


def load_prune_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PruneConfig:
    """PruneConfig from a YAML recipe plus ``key=value`` overrides, type-checked against the schema."""
    from compress.structured import load_structured

    return load_structured(PruneConfig, path, overrides, what="prune recipe")
