"""Typed configs of a distillation run; a recipe is YAML merged over these dataclasses by OmegaConf.

``load_recipe(path, ["key=value", ...])`` type-checks every key (unknown keys and wrong types are errors) and
returns a plain :class:`DistillConfig`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from compress.checks import check_size, require_non_negative, require_positive
from compress.data import DatasetSpec
from compress.errors import ConfigError
from compress.models import StudentSpec
from compress.structured import load_structured, to_plain
from compress.teacher_ref import TeacherRef
from compress.training import OptimConfig

__all__ = [
    "AMP_MODES",
    "CostVolumeLossConfig",
    "DataConfig",
    "DatasetSpec",
    "DistillConfig",
    "FeatureLossConfig",
    "LabelCacheConfig",
    "LossConfig",
    "OptimConfig",
    "OutputLossConfig",
    "LabelCacheSpec",
    "StudentSpec",
    "TeacherRef",
    "config_to_dict",
    "from_label_cache",
    "load_recipe",
    "trial_config",
]

AMP_MODES = ("off", "bf16", "fp16")
_DTYPES = ("float16", "float32")
PROB_MODES = ("full", "topk", "none")


# ------------------------------------------------------------------------------------------------ losses


@dataclass
class FeatureLossConfig:
    """MSE between student and teacher left feature pyramids, levels matched by resolution."""

    enabled: bool = True
    weight: float = 0.1
    levels: list[int] | None = None
    """Teacher pyramid levels (0 = finest) to distil; None = every level the student has a match for."""
    normalize: bool = False
    """Standardise each pixel's feature vector (zero mean, unit variance over channels) before the MSE, so
    levels of very different magnitude weigh alike."""

    def __post_init__(self) -> None:
        require_non_negative("loss.feature.weight", self.weight)


@dataclass
class CostVolumeLossConfig:
    """KL(teacher || student) between the disparity distributions (softmax over D of cost_logits)."""

    enabled: bool = True
    weight: float = 1.0
    temperature: float = 1.0
    """Both distributions are softened by this temperature; the loss is multiplied by its square so gradient
    magnitudes stay comparable across temperatures."""

    def __post_init__(self) -> None:
        require_non_negative("loss.cost_volume.weight", self.weight)
        require_positive("loss.cost_volume.temperature", self.temperature)


@dataclass
class OutputLossConfig:
    """Sequence loss over the student's per-iteration disparities plus its initial disparity."""

    enabled: bool = True
    weight: float = 1.0
    """Weight of the smooth-L1 to the teacher's final disparity."""
    gt_weight: float = 1.0
    """Weight of the smooth-L1 to ground truth (samples with has_gt only, masked by valid)."""
    init_weight: float = 0.5
    """Weight of the initial (cost-volume) disparity term, upsampled to full resolution."""
    gamma: float = 0.9
    """Prediction k of K weighs gamma ** (K - k): the last one 1."""
    beta: float = 1.0
    """Smooth-L1 transition point (pixels)."""
    max_disp: float | None = None
    """Ignore pixels whose target disparity is >= this (pixels); None = keep all."""

    def __post_init__(self) -> None:
        for key in ("weight", "gt_weight", "init_weight"):
            require_non_negative(f"loss.output.{key}", getattr(self, key))
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"loss.output.gamma: got {self.gamma}, expected 0 < gamma <= 1")
        require_positive("loss.output.beta", self.beta)
        if self.max_disp is not None:
            require_positive("loss.output.max_disp", self.max_disp)


@dataclass
class LossConfig:
    """The three distillation losses; each is logged on its own."""

    feature: FeatureLossConfig = field(default_factory=FeatureLossConfig)
    cost_volume: CostVolumeLossConfig = field(default_factory=CostVolumeLossConfig)
    output: OutputLossConfig = field(default_factory=OutputLossConfig)


# ------------------------------------------------------------------------------------------------ labels


@dataclass
class LabelCacheConfig:
    """What the teacher pseudo-label cache stores (see compress.distill.label_cache for sizes per sample).

    The teacher's iterations are the teacher's key (``teacher.iters``) and the size pairs are labelled at is the
    data's (``data.size``): one key each in a recipe."""

    disp_dtype: str = "float16"
    prob: str = "full"
    """Disparity distribution: 'full' (every level), 'topk' (k most likely levels + indices) or 'none'."""
    prob_topk: int = 8
    prob_downsample: int = 1
    """Average-pool the distribution spatially by this factor before storing (1 = volume resolution)."""
    prob_dtype: str = "float16"
    feature_levels: list[int] = field(default_factory=list)
    """Teacher left-pyramid levels to store (0 = finest, 1/4); empty = none."""
    feature_dtype: str = "float16"
    batch_size: int = 1
    flush_every: int = 16
    """Persist the memory maps and the done-mask every this many samples (and at the end)."""

    def __post_init__(self) -> None:
        for key in ("disp_dtype", "prob_dtype", "feature_dtype"):
            if getattr(self, key) not in _DTYPES:
                raise ConfigError(f"label cache {key}: got {getattr(self, key)!r}, expected one of {_DTYPES}")
        if self.prob not in PROB_MODES:
            raise ConfigError(f"label cache prob: got {self.prob!r}, expected one of {PROB_MODES}")
        if self.prob_topk < 1 or self.prob_downsample < 1 or self.batch_size < 1 or self.flush_every < 1:
            raise ConfigError(
                "label cache prob_topk, prob_downsample, batch_size and flush_every must all be >= 1; got "
                f"{self.prob_topk}, {self.prob_downsample}, {self.batch_size}, {self.flush_every}"
            )
        if any(int(level) < 0 for level in self.feature_levels):
            raise ConfigError(f"label cache feature_levels: got {list(self.feature_levels)}, expected indices >= 0")
        self.feature_levels = sorted({int(level) for level in self.feature_levels})

    def content_key(self) -> dict[str, Any]:
        """The settings of this section that change what is stored (a cache made with other ones must not be
        reused); the manifest adds the teacher's iterations and the label size (``build_label_cache``)."""
        stored = {f.name for f in dataclasses.fields(LabelCacheConfig)}  # not where a subclass keeps the cache
        out = {k: v for k, v in dataclasses.asdict(self).items() if k in stored}
        unused = ["batch_size", "flush_every"]  # change how labels are made, not what they are
        if self.prob != "topk":
            unused.append("prob_topk")
        if self.prob == "none":
            unused += ["prob_downsample", "prob_dtype"]
        if not self.feature_levels:
            unused.append("feature_dtype")
        for key in unused:
            out.pop(key)
        return out


@dataclass
class LabelCacheSpec(LabelCacheConfig):
    """``ffsc distill``'s label cache: where it is, whether to label what it lacks, and what it stores."""

    folder: str | None = None
    """Folder of a pseudo-label cache; when set, training reads labels from it and never runs the teacher."""
    build: bool = True
    """Label the missing samples of ``folder`` with the teacher before training (else: error)."""


# -------------------------------------------------------------------------------------------------- data


@dataclass
class DataConfig:
    """Training and evaluation data, and training augmentation."""

    train: DatasetSpec = field(default_factory=DatasetSpec)
    eval: DatasetSpec | None = None
    """None = evaluate on the first ``eval_samples`` training samples, un-augmented."""
    eval_samples: int = 4
    labels: LabelCacheSpec = field(default_factory=LabelCacheSpec)
    """The teacher's label cache (the run recipe's ``data.labels``, plus its folder); the teacher labels at
    ``teacher.iters``, each pair centre-cropped to ``size``."""
    size: list[int] | None = None
    """[height, width] every training pair is centre-cropped to before the teacher labels it (with
    ``data.labels.folder``; multiples of 32); None = the first pair's size rounded down to multiples of 32, which
    every pair must then share. Fixed per pair, unlike ``crop_size``."""
    crop_size: list[int] | None = None
    """[height, width] random training crop (multiples of 32), drawn anew every step inside the labelled pair;
    applied to cached labels alike."""
    vflip_prob: float = 0.0
    jitter_prob: float = 0.0
    """Colour jitter (photometric only, so cached labels stay valid)."""
    scale_prob: float = 0.0
    """Random rescaling; only with a live teacher (cached labels cannot follow a resize)."""

    def __post_init__(self) -> None:
        check_size("data.size", self.size)
        check_size("data.crop_size", self.crop_size)
        if self.eval_samples < 0:
            raise ConfigError(f"data.eval_samples: got {self.eval_samples}, expected >= 0")
        for key in ("vflip_prob", "jitter_prob", "scale_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"data.{key}: got {getattr(self, key)}, expected a probability in [0, 1]")


# ---------------------------------------------------------------------------------------------------- run


@dataclass
class DistillConfig:
    """A whole distillation run (``ffsc distill RECIPE.yaml key=value ...``)."""

    RENAMED: ClassVar[dict[str, str]] = {"teacher.cache.iters": "teacher.iters", "teacher.cache.size": "data.size",
                                         "teacher.cache": "data.labels", "teacher.label_cache": "data.labels.folder",
                                         "teacher.build_cache": "data.labels.build",
                                         "teacher.allow_random_init": "teacher.stand_in=random"}

    run_dir: str = "runs/distill"
    seed: int = 0
    steps: int = 1000
    batch_size: int = 2
    """Per process: the global batch is batch_size * world size."""
    train_iters: int = 4
    """Student GRU iterations during training."""
    eval_iters: int = 8
    amp: str = "bf16"
    """'off', 'bf16' or 'fp16' autocast of the student (and live teacher) forward; CUDA only, off on CPU."""
    device: str | None = None
    """None = cuda when available (cuda:LOCAL_RANK under torchrun), else cpu."""
    num_workers: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    eval_every: int = 500
    """0 = only at the end."""
    resume: bool = True
    """Continue from run_dir/checkpoint.pt when it exists."""
    progress: bool = True
    ddp_find_unused_parameters: bool = True
    """Students may hold parameters a forward does not reach (e.g. unused GRU levels); DDP must be told."""
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentSpec = field(default_factory=StudentSpec)
    teacher: TeacherRef = field(default_factory=TeacherRef)
    """The official checkpoint, or ``stand_in: random`` (tests and smoke runs); none with a finished label cache."""
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "train_iters", "eval_iters", "log_every", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: got {getattr(self, key)}, expected >= 1")
        if self.eval_every < 0 or self.num_workers < 0:
            raise ConfigError(f"eval_every/num_workers: got {self.eval_every}/{self.num_workers}, expected >= 0")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp: got {self.amp!r}, expected one of {AMP_MODES}")
        self.teacher.check_for("ffsc distill", ("random",))
        cache = self.data.labels.folder
        if cache is None and self.teacher.checkpoint is None and self.teacher.stand_in != "random":
            raise ConfigError(
                "no teacher: set teacher.checkpoint (official FoundationStereo .pth) or data.labels.folder "
                "(a pseudo-label folder)"
            )
        if self.data.size is not None and cache is None:  # a live teacher sees the augmented pair
            raise ConfigError("data.size is the size pairs are labelled at in the label cache; set data.labels.folder "
                              "too, or crop a live teacher's pairs with data.crop_size")
        if cache is not None and (self.data.scale_prob > 0 or self.data.vflip_prob > 0):
            raise ConfigError(
                "data.scale_prob and data.vflip_prob need a live teacher: cached labels follow crops only; set "
                "them to 0 or data.labels.folder=null"
            )


# --------------------------------------------------------------------------------------------- loading


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (for YAML, checkpoints and MLflow params)."""
    return to_plain(cfg)


def from_label_cache(run_dir: str | Path, student: StudentSpec, train: DatasetSpec, labels_dir: str | Path,
                     labels: LabelCacheConfig, iters: int, crop_size: list[int] | None = None,
                     **settings: Any) -> DistillConfig:
    """A run that distils ``student`` from a finished label cache of ``train`` (no live teacher, no evaluation),
    on random ``crop_size`` crops of the labelled pairs when given."""
    stored = {f.name: getattr(labels, f.name) for f in dataclasses.fields(LabelCacheConfig)}
    cache = LabelCacheSpec(**stored, folder=str(labels_dir), build=False)
    return DistillConfig(run_dir=str(run_dir), train_iters=iters, eval_iters=iters, eval_every=0, student=student,
                         data=DataConfig(train=train, eval=None, eval_samples=0, crop_size=crop_size, labels=cache),
                         **settings)


def trial_config(run_dir: str | Path, student: StudentSpec, train: DatasetSpec, labels_dir: str | Path,
                 labels: LabelCacheConfig, iters: int, *, steps: int, batch_size: int, loss: LossConfig,
                 optim: OptimConfig, seed: int, device: str, crop_size: list[int] | None = None,
                 progress: bool = False, checkpoint_every: int | None = None) -> DistillConfig:
    """The short distillation of a search trial (and of its parent) from a label cache: fp32, the warm-up clipped to
    a quarter of the steps; quiet and one checkpoint at the end unless ``progress`` and ``checkpoint_every`` say
    otherwise (the parent's long distillation shows its progress and resumes from its checkpoints)."""
    return from_label_cache(
        run_dir, student, train, labels_dir, labels, iters, crop_size=crop_size, seed=seed, steps=steps,
        batch_size=batch_size, amp="off", device=device, log_every=max(1, steps // 4),
        checkpoint_every=checkpoint_every or steps, progress=progress, loss=loss,
        optim=dataclasses.replace(optim, warmup_steps=min(optim.warmup_steps, steps // 4)),
    )


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> DistillConfig:
    """DistillConfig from a YAML recipe plus ``key=value`` overrides, type-checked against the schema."""
    return load_structured(DistillConfig, path, overrides)
