"""RunRecipe: the typed schema of ``recipes/*.yaml`` for ``ffsc run``, merged with key=value overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from compress.checks import check_size, require_at_least, require_positive
from compress.data import DatasetSpec
from compress.distill.config import LabelCacheConfig, LossConfig, OptimConfig
from compress.errors import ConfigError
from compress.latency import LatencyConfig
from compress.metrics import METRIC_KEYS
from compress.nas.objective import check_proxy
from compress.nas.spec import SAMPLERS
from compress.prune.config import BUDGETS, DistillSpec, PruneSettings
from compress.quantize import QuantizeConfig
from compress.real_pairs import RealPairsConfig
from compress.structured import did_you_mean, load_structured, to_plain
from compress.teacher_ref import StandInTraining, TeacherRef
from compress.tracking import TrackingConfig

CHOICES = ("min_error", "fastest")
TEACHER_TRAIN = (("fallback_preset", "preset"), ("fallback_overrides", "overrides"), ("train_steps", "steps"),
                 ("train_batch_size", "batch_size"), ("optim", "optim"), ("train_lr", "optim.lr"))
"""The stand-in's training keys of ``teacher`` before they moved under ``teacher.train`` in the stand-in recipe's
words."""
ERROR_METRICS = tuple(f"{against}/{key}" for against in ("teacher", "gt") for key in METRIC_KEYS)
"""What ``search.error_metric`` may name: a held-out metric against the teacher's labels or the ground truth."""
RUN_STAND_INS = ("shipped", "train")
"""The stand-in teachers ``ffsc run`` and ``ffsc nas`` take by name (besides a saved student folder)."""
EXPORT_FORMATS = ("onnx", "onnx_int8", "engine")
ENGINE_PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class DataStage:
    """Training data (labelled by the teacher) and held-out data (for scoring students)."""

    train: DatasetSpec = field(default_factory=lambda: DatasetSpec(num_samples=48))
    eval: DatasetSpec = field(default_factory=lambda: DatasetSpec(num_samples=8))
    labels: LabelCacheConfig = field(default_factory=LabelCacheConfig)
    """What the label cache stores; the teacher labels at ``teacher.iters``, each pair centre-cropped to ``size``."""
    size: list[int] | None = None
    """[height, width] every training and held-out pair is centre-cropped to before the teacher labels it, fixed per
    pair, multiples of 32; None: the first pair's size rounded down to multiples of 32, which every pair must then
    share."""
    crop_size: list[int] | None = None
    """[height, width] random crop of each labelled training pair for every distillation (the search's proxy, the
    final student), drawn anew every step inside ``size``, multiples of 32; None: whole pairs. Large scenes keep a
    realistic disparity range, crops keep steps cheap."""

    def __post_init__(self) -> None:
        check_size("data.size", self.size)
        check_size("data.crop_size", self.crop_size)


@dataclass
class SearchStage:
    """The Optuna NAS over a search space: accuracy proxy (short distillation) vs latency."""

    enabled: bool = True
    space: str = "tiny"
    n_trials: int = 12
    sampler: str = "nsga2"
    seed: int = 0
    budget_ms: float | None = None
    """Latency budget of a front student (an Optuna constraint), in milliseconds on ``latency``."""
    speedup: float | None = None
    """Instead of ``budget_ms``: every front student at least this many times faster than the teacher, timed once
    with ``latency`` before the search (the budget is the teacher's latency over ``speedup``, kept in the run)."""
    storage: str | None = None
    """None = SQLite in the run directory; 'journal:PATH' for several processes; an RDB URL for machines."""
    distill_steps: int = 40
    proxy: str = "inherit"
    """How a trial's student starts its short distillation: 'inherit' (weights sliced from the space's largest
    member, trained once per study for ``parent_steps``; see compress.nas.inherit) or 'distill' (random init).
    benchmarks/search_quality.py: Kendall tau 0.70 vs 0.42 between proxy and fully trained EPE on 12 students."""
    parent_steps: int = 300
    parent: str = "auto"
    """Whose sub-networks the search looks at, and where every trial's weights come from: 'auto' (the teacher when
    it is of the student family, as the stand-in is; else 'largest'), 'teacher', 'largest' (the space's largest
    member, distilled for ``parent_steps``), or a saved student folder (an imported Fast-FoundationStereo release,
    any ffsc student). With a trained parent the space is laid over it (``space: subnets`` derives it)."""
    batch_size: int = 4
    error_metric: str = "teacher/epe"
    """Held-out metric to minimise: 'teacher/epe' (agreement with the teacher) or 'gt/epe'."""
    latency: LatencyConfig = field(default_factory=lambda: LatencyConfig(warmup=2, repeats=7))
    """Also the latency settings of the prune stage and of the final table."""
    timeout: float | None = None

    def __post_init__(self) -> None:
        require_at_least("search.n_trials", self.n_trials, 1)
        require_at_least("search.distill_steps", self.distill_steps, 1, "each candidate is scored after distilling")
        require_at_least("search.batch_size", self.batch_size, 1)
        require_positive("search.budget_ms", self.budget_ms, allow_none=True)
        require_positive("search.speedup", self.speedup, allow_none=True)
        if self.speedup is not None and self.budget_ms is not None:
            raise ConfigError(f"search.speedup={self.speedup:g} and search.budget_ms={self.budget_ms:g} both set a "
                              "latency budget; keep one")
        require_positive("search.timeout", self.timeout, allow_none=True)
        check_proxy(self.proxy, self.parent_steps, "search")
        if str(self.sampler).lower() not in SAMPLERS:
            raise ConfigError(f"search.sampler={self.sampler!r}: expected one of {list(SAMPLERS)}"
                              f"{did_you_mean(str(self.sampler).lower(), SAMPLERS)}")
        if self.error_metric not in ERROR_METRICS:
            raise ConfigError(f"search.error_metric={self.error_metric!r}: expected one of {list(ERROR_METRICS)} "
                              "(against the teacher's labels or the ground truth)"
                              f"{did_you_mean(self.error_metric, ERROR_METRICS)}")
        if not self.parent:
            raise ConfigError("search.parent: got an empty value, expected 'auto', 'teacher', 'largest' or a saved "
                              "student folder")


@dataclass
class PruneStage(PruneSettings):
    """Optional structured pruning of the chosen student to a budget (see compress.prune), on the search's
    latency settings and the recipe's training data."""

    enabled: bool = False
    samples: int = 16
    """Training pairs used for Taylor scores and for the distillation between and after steps."""
    distill: DistillSpec = field(default_factory=lambda: DistillSpec(recovery_steps=50))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.enabled and self.budget.kind is None:
            raise ConfigError(f"prune.enabled needs one of prune.{', '.join(BUDGETS)}")
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

    def __post_init__(self) -> None:
        require_at_least("distill.steps", self.steps, 1)
        require_at_least("distill.batch_size", self.batch_size, 1)
        if self.choose not in CHOICES:
            raise ConfigError(f"distill.choose={self.choose!r}: expected one of {list(CHOICES)}")


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

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in EXPORT_FORMATS]
        if unknown:
            raise ConfigError(f"export.formats: unknown {unknown}; expected a list of {list(EXPORT_FORMATS)}")
        if self.precision not in ENGINE_PRECISIONS:
            raise ConfigError(f"export.precision={self.precision!r}: expected one of {list(ENGINE_PRECISIONS)}")


@dataclass
class RunRecipe:
    """One source of truth for a run (``ffsc run RECIPE key=value ...``)."""

    # A stage is switched off by its own ``enabled`` (the teacher and labels always run).
    RENAMED: ClassVar[dict[str, str]] = {"stages": "search.enabled, prune.enabled, distill.enabled, export.enabled",
                                         "data.labels.iters": "teacher.iters", "data.labels.size": "data.size",
                                         "prune.distill.teacher_iters": "teacher.iters",
                                         **{f"teacher.{old}": f"teacher.train.{new}" for old, new in TEACHER_TRAIN}}

    name: str = "run"
    run_dir: str | None = None
    """None = runs/<name>-<time>; point at an existing run directory to resume it."""
    seed: int = 0
    device: str | None = None
    height: int = 64
    width: int = 128
    """Working resolution: latency is measured and models are exported at this size."""
    data: DataStage = field(default_factory=DataStage)
    teacher: TeacherRef = field(default_factory=TeacherRef)
    """The official checkpoint, else a stand-in: 'shipped' (the default), 'train' (as ``teacher.train`` says) or a
    saved student folder."""
    search: SearchStage = field(default_factory=SearchStage)
    prune: PruneStage = field(default_factory=PruneStage)
    distill: DistillStage = field(default_factory=DistillStage)
    export: ExportStage = field(default_factory=ExportStage)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=10))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    real_pairs: RealPairsConfig = field(default_factory=RealPairsConfig)
    """Labelled real pairs the teacher, the front and the final student are scored on (reported only: never used
    to train or to choose a student). Default: Middlebury Motorcycle at full size, with scikit-image."""
    progress: bool = True

    def __post_init__(self) -> None:
        self.teacher.check_for("ffsc run", RUN_STAND_INS, folders=True)
        if self.teacher.stand_in is None:
            self.teacher.stand_in = "shipped"
        if self.teacher.train is None:
            self.teacher.train = StandInTraining()
        require_at_least("height", self.height, 32)
        require_at_least("width", self.width, 32)
        if self.height % 32 or self.width % 32:
            raise ConfigError(f"height/width: got {self.height}x{self.width}, expected multiples of 32")
        for key in ("height", "width"):  # latency is timed at the working size unless the recipe says otherwise
            if getattr(self.search.latency, key) is None:
                setattr(self.search.latency, key, getattr(self, key))
        if not self.tracking.enabled:  # the study's parent run and its trials are where `ffsc run` keeps the search
            raise ConfigError("tracking.enabled=false: `ffsc run` records the search in MLflow; point tracking.uri "
                              "at another store instead (default: mlflow.db in the run directory)")
        if self.prune.enabled and not self.search.enabled:
            raise ConfigError("prune.enabled prunes the student the search chose, but the search stage is off; "
                              "use `ffsc prune` to prune a saved model on its own")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML, MLflow params)."""
        return to_plain(self)


def load_run_recipe(path: str | Path | None, overrides: list[str] | None = None) -> RunRecipe:
    """RunRecipe from YAML plus ``key=value`` overrides, type-checked against the schema."""
    return load_structured(RunRecipe, path, overrides)
