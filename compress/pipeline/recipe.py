"""RunRecipe: the typed schema of ``recipes/*.yaml`` for ``ffsc run``, merged with key=value overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.distill.config import DatasetSpec, LabelCacheConfig, LossConfig, OptimConfig
from compress.errors import ConfigError
from compress.quantize import QuantizeConfig
from compress.structured import load_structured

STAGES = ("teacher", "search", "prune", "distill", "export")


@dataclass
class TeacherStage:
    """The teacher: an official checkpoint, or (without one) a small stand-in trained on ground truth."""

    checkpoint: str | None = None
    """Official FoundationStereo model_best_bp2.pth (cfg.yaml beside it)."""
    config: str | None = None
    """cfg.yaml when it is not beside the checkpoint."""
    trust_checkpoint: bool = False
    iters: int | None = None
    """Teacher GRU iterations for labelling; None = valid_iters of its config."""
    fallback_preset: str = "quickstart_teacher"
    """Without a checkpoint: the search_spaces preset trained as the teacher."""
    fallback_overrides: dict[str, Any] = field(default_factory=dict)
    train_steps: int = 300
    train_batch_size: int = 4
    train_lr: float = 1e-3


@dataclass
class DataStage:
    """Training data (labelled by the teacher) and held-out data (for scoring students)."""

    train: DatasetSpec = field(default_factory=lambda: DatasetSpec(num_samples=48))
    eval: DatasetSpec = field(default_factory=lambda: DatasetSpec(num_samples=8))
    labels: LabelCacheConfig = field(default_factory=LabelCacheConfig)


@dataclass
class LatencyStage:
    """How candidate latency is obtained: measured on this machine's backend, or predicted from tables."""

    mode: str = "measured"
    backend: str = "onnxruntime"
    precision: str = "fp32"
    warmup: int = 2
    repeats: int = 7
    threads: int | None = None
    report_rounds: int = 3
    """Rounds of the final table's side-by-side timing of teacher, front and final student (0 = skip it)."""

    def __post_init__(self) -> None:
        if self.mode not in ("measured", "predicted"):
            raise ConfigError(f"search.latency.mode: got {self.mode!r}, expected 'measured' or 'predicted'")
        if self.report_rounds < 0:
            raise ConfigError(f"search.latency.report_rounds: got {self.report_rounds}, expected >= 0")


@dataclass
class SearchStage:
    """The Optuna NAS over a search space: accuracy proxy (short distillation) vs latency."""

    enabled: bool = True
    space: str = "tiny"
    n_trials: int = 12
    sampler: str = "nsga2"
    seed: int = 0
    budget_ms: float | None = None
    storage: str | None = None
    """None = SQLite in the run directory; 'journal:PATH' for several processes; an RDB URL for machines."""
    distill_steps: int = 40
    batch_size: int = 4
    error_metric: str = "teacher/epe"
    """Held-out metric to minimise: 'teacher/epe' (agreement with the teacher) or 'gt/epe'."""
    latency: LatencyStage = field(default_factory=LatencyStage)
    timeout: float | None = None


@dataclass
class PruneStage:
    """Optional structured pruning of the chosen student to a budget (see compress.prune)."""

    enabled: bool = False
    budget_ms: float | None = None
    """Median latency on the search's latency settings (backend, precision, size)."""
    budget_gmacs: float | None = None
    budget_mparams: float | None = None
    ratio: float | None = None
    """Fraction of the in-scope channels to remove (no measurement)."""
    scope: list[str] = field(default_factory=lambda: ["refinement"])
    importance: str = "taylor"
    step_ratio: float = 0.2
    max_steps: int = 10
    round_to: int = 8
    samples: int = 16
    """Training pairs used for Taylor scores and for the distillation between and after steps."""
    steps_between: int = 20
    recovery_steps: int = 50
    lr: float = 1e-4

    def __post_init__(self) -> None:
        budgets = [k for k in ("budget_ms", "budget_gmacs", "budget_mparams", "ratio") if getattr(self, k) is not None]
        if self.enabled and len(budgets) != 1:
            raise ConfigError(f"prune.enabled needs exactly one of prune.budget_ms, budget_gmacs, budget_mparams, "
                              f"ratio; got {', '.join(budgets) or 'none'}")
        if self.samples < 1:
            raise ConfigError(f"prune.samples: got {self.samples}, expected >= 1")


@dataclass
class DistillStage:
    """Final distillation of the chosen student from the teacher's labels."""

    enabled: bool = True
    steps: int = 300
    batch_size: int = 4
    choose: str = "min_error"
    """Which front student to finish: 'min_error' within the budget, or 'fastest'."""


@dataclass
class ExportStage:
    """Deployment artifacts of the final student."""

    enabled: bool = True
    formats: list[str] = field(default_factory=lambda: ["onnx"])
    """'onnx', 'onnx_int8' (INT8 Q/DQ ONNX + accuracy report, settings in ``quantize``), 'engine'."""
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    opset: int = 17
    precision: str = "fp16"
    """TensorRT engine precision (engine format only)."""


@dataclass
class TrackingStage:
    """MLflow: a local SQLite store in the run directory unless a tracking URI is given."""

    uri: str | None = None
    experiment: str = "ffsc"


@dataclass
class RunRecipe:
    """One source of truth for a run (``ffsc run RECIPE key=value ...``)."""

    name: str = "run"
    run_dir: str | None = None
    """None = runs/<name>-<time>; point at an existing run directory to resume it."""
    seed: int = 0
    device: str | None = None
    height: int = 64
    width: int = 128
    """Working resolution: latency is measured and models are exported at this size."""
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    data: DataStage = field(default_factory=DataStage)
    teacher: TeacherStage = field(default_factory=TeacherStage)
    search: SearchStage = field(default_factory=SearchStage)
    prune: PruneStage = field(default_factory=PruneStage)
    distill: DistillStage = field(default_factory=DistillStage)
    export: ExportStage = field(default_factory=ExportStage)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=10))
    tracking: TrackingStage = field(default_factory=TrackingStage)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.height % 32 or self.width % 32:
            raise ConfigError(f"height/width: got {self.height}x{self.width}, expected multiples of 32")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"stages: unknown {unknown}; expected a subset of {list(STAGES)}")
        searching = "search" in self.stages and self.search.enabled
        if "prune" in self.stages and self.prune.enabled and not searching:
            raise ConfigError("prune.enabled prunes the student the search chose, but the search stage is off; "
                              "use `ffsc prune` to prune a saved model on its own")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML, MLflow params)."""
        return dataclasses.asdict(self)


def load_run_recipe(path: str | Path | None, overrides: list[str] | None = None) -> RunRecipe:
    """RunRecipe from YAML plus ``key=value`` overrides, type-checked against the schema."""
    return load_structured(RunRecipe, path, overrides)
