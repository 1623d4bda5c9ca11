"""Typed configuration of a pruning run; a recipe is YAML merged over these dataclasses by OmegaConf.

``load_prune_config(path, ["key=value", ...])`` type-checks every key (unknown keys and wrong types are errors)
and returns a plain :class:`PruneConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from compress.checks import check_size, require_positive
from compress.data import DatasetSpec
from compress.errors import ConfigError
from compress.latency import LatencyConfig
from compress.pruning_rules import PARTS
from compress.structured import load_structured, to_plain
from compress.teacher_ref import TeacherRef
from compress.tracking import TrackingConfig
from compress.training import OptimConfig

from .importance import METHODS

BUDGETS = {"budget_ms": "latency_ms", "budget_gmacs": "gmacs", "budget_mparams": "mparams", "ratio": "ratio"}
"""Budget key -> the measured quantity it bounds (prune_result.json's budget_kind)."""


class Budget(NamedTuple):
    """The budget that is set: the quantity it bounds (latency_ms, gmacs, mparams, ratio) and its value."""

    kind: str | None
    value: float | None


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
class DataSpec(DatasetSpec):
    """Calibration and distillation images: a dataset folder, or synthetic pairs when ``path`` is null."""

    kind: str = "auto"
    num_samples: int = 8
    """Samples used (synthetic: generated; folder: the first ones)."""
    size: list[int] | None = None
    """[height, width] centre crop (multiples of 32); null = each image rounded down to multiples of 32."""
    eval_samples: int = 2
    """Samples (from the same set) the EPE against the teacher is reported on."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("data.size", self.size)
        if self.eval_samples < 0:
            raise ConfigError(f"data.eval_samples: got {self.eval_samples}, expected >= 0")


@dataclass
class DistillSpec:
    """Distillation between pruning steps and after the last one (recovery), against the teacher."""

    RENAMED: ClassVar[dict[str, str]] = {"lr": "optim.lr", "grad_clip": "optim.grad_clip"}

    steps_between: int = 20
    recovery_steps: int = 200
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.0, warmup_steps=0))
    """The built-in loop's optimiser: cosine decay from ``optim.lr`` over each distillation, no warm-up."""
    batch_size: int = 1
    train_iters: int = 4
    """Student GRU iterations while distilling (the teacher's are ``teacher.iters``)."""
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
        if self.batch_size < 1 or self.train_iters < 1:
            raise ConfigError(f"distill.batch_size/train_iters: got {self.batch_size}/{self.train_iters}, "
                              "expected >= 1")
        if self.gt_weight < 0 or self.init_weight < 0:
            raise ConfigError(f"distill.gt_weight/init_weight: got {self.gt_weight}/{self.init_weight}, "
                              "expected >= 0")


@dataclass
class PruneSettings:
    """What pruning does, shared by ``ffsc prune`` (PruneConfig) and the run recipe's prune stage."""

    budget_ms: float | None = None
    """Median latency of one forward (all GRU iterations) on the ``latency`` settings."""
    budget_gmacs: float | None = None
    """MACs of one forward at ``latency.height`` x ``latency.width``, in units of 1e9."""
    budget_mparams: float | None = None
    """Parameters, in millions."""
    ratio: float | None = None
    """Fraction of the in-scope channels to remove (no measurement). Set at most one of the four budgets."""
    scope: list[str] = field(default_factory=lambda: ["refinement"])
    """Parts to prune: backbone, cost_filtering, refinement (teachers: refinement only)."""
    round_to: int = 8
    """Pruned widths are multiples of this (tensor cores stay fed)."""
    step_ratio: float = 0.2
    """Each step keeps (1 - step_ratio) of the previous target width (relative to the original widths)."""
    max_steps: int = 10
    max_ratio: float = 0.9
    """No group loses more than this fraction of its original width."""
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    distill: DistillSpec = field(default_factory=DistillSpec)

    def __post_init__(self) -> None:
        given = [k for k in BUDGETS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ConfigError(f"budget: got {', '.join(given)}; set exactly one of {', '.join(BUDGETS)}")
        for key in given:
            require_positive(key, getattr(self, key))
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise ConfigError(f"ratio: got {self.ratio}, expected a fraction between 0 and 1")
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

    @property
    def budget(self) -> Budget:
        """The budget that is set (kind and value None when none is)."""
        key = next((k for k in BUDGETS if getattr(self, k) is not None), None)
        return Budget(None, None) if key is None else Budget(BUDGETS[key], float(getattr(self, key)))


@dataclass
class PruneConfig(PruneSettings):
    """A whole pruning run (``ffsc prune``)."""

    RENAMED: ClassVar[dict[str, str]] = {"out": "run_dir", "mlflow": "tracking.enabled",
                                         "tracking_uri": "tracking.uri", "experiment": "tracking.experiment",
                                         "distill.teacher_iters": "teacher.iters", "teacher_iters": "teacher.iters",
                                         "teacher": "teacher.checkpoint"}

    model: str = "preset:fast_foundationstereo"
    """A saved student or pruned-teacher folder, an official teacher checkpoint (cfg.yaml beside it), or
    preset:NAME (a randomly initialised student preset)."""
    teacher: TeacherRef = field(default_factory=TeacherRef)
    """The distillation teacher: ``teacher.checkpoint`` in the forms of ``model`` (None = the unpruned model itself)
    and ``teacher.iters``, its GRU iterations for the targets (None = its deployment count)."""
    run_dir: str = "runs/prune"
    """The output folder: model/, prune_result.json, log.jsonl, config.yaml (and mlflow.db by default)."""
    seed: int = 0
    device: str | None = None
    """Where pruning and distillation run; None = cuda when available, else cpu."""
    progress: bool = True
    trace_size: list[int] = field(default_factory=lambda: [32, 64])
    """[height, width] of the (meta-device) forward that builds the dependency graph."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow (``ffsc prune``): the config as params, every step's metrics, the result file."""
    latency: LatencyConfig = field(default_factory=lambda: LatencyConfig(height=480, width=640))
    data: DataSpec = field(default_factory=DataSpec)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("trace_size", self.trace_size)
        self.teacher.check_for("ffsc prune", ())
        if self.latency.height is None or self.latency.width is None:
            raise ConfigError("latency.height/width: got null, expected the input size to time and count MACs at")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML, JSON, MLflow params)."""
        return to_plain(self)


def load_prune_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PruneConfig:
    """PruneConfig from a YAML recipe plus ``key=value`` overrides, type-checked against the schema."""
    return load_structured(PruneConfig, path, overrides, what="prune recipe")
