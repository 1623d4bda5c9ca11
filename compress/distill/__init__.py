"""Distillation of FoundationStereo into students: losses, a teacher pseudo-label cache, and the trainer."""

from compress.data.datasets import build_dataset
from compress.evaluation import evaluate_student
from compress.models import save_distilled_student, student_path

from .config import (
    CostVolumeLossConfig,
    DataConfig,
    DatasetSpec,
    DistillConfig,
    FeatureLossConfig,
    LabelCacheConfig,
    LabelCacheSpec,
    LossConfig,
    OptimConfig,
    OutputLossConfig,
    StudentSpec,
    TeacherRef,
    load_recipe,
)
from .label_cache import (
    LabelCache,
    LabelCacheError,
    LabelledDataset,
    build_label_cache,
    cache_progress,
    dataset_fingerprint,
    teacher_identity,
)
from .losses import (
    DistillLoss,
    FeatureAdapters,
    GroundTruth,
    TeacherTargets,
    cost_volume_loss,
    feature_loss,
    output_loss,
    rebin_disparity,
    resample_distribution,
)
from .trainer import DistillResult, Trainer, distill

__all__ = [
    "CostVolumeLossConfig",
    "DataConfig",
    "DatasetSpec",
    "DistillConfig",
    "DistillLoss",
    "DistillResult",
    "FeatureAdapters",
    "FeatureLossConfig",
    "GroundTruth",
    "LabelCache",
    "LabelCacheConfig",
    "LabelCacheError",
    "LabelCacheSpec",
    "LabelledDataset",
    "LossConfig",
    "OptimConfig",
    "OutputLossConfig",
    "StudentSpec",
    "TeacherRef",
    "TeacherTargets",
    "Trainer",
    "build_dataset",
    "build_label_cache",
    "cache_progress",
    "cost_volume_loss",
    "dataset_fingerprint",
    "distill",
    "evaluate_student",
    "feature_loss",
    "load_recipe",
    "output_loss",
    "rebin_disparity",
    "resample_distribution",
    "save_distilled_student",
    "student_path",
    "teacher_identity",
]
