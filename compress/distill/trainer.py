"""Distillation trainer: a student learns from cached teacher labels or a live teacher, on one or many processes.

``distill(cfg)`` runs a whole recipe; :class:`Trainer` exposes the pieces. Under ``torchrun`` it trains with
DistributedDataParallel (NCCL on GPU, gloo on CPU); only rank 0 writes logs, checkpoints and the student.

Reproducibility: the data order is a function of (seed, step) only (a DistributedSampler reshuffled per
epoch, resumed mid-epoch by skipping the batches already seen), augmentation draws from (seed, epoch,
index), and checkpoints hold the model, adapters, optimizer, scheduler, grad scaler and every RNG state. A
run killed after a checkpoint and resumed therefore ends bitwise equal to an uninterrupted one on CPU.

Run as a script (also under torchrun)::

    python -m compress.distill.trainer RECIPE.yaml key=value ...
    torchrun --nproc_per_node=2 -m compress.distill.trainer RECIPE.yaml
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from compress.atomic import atomic_write, atomic_write_text
from compress.data.augment import AugmentConfig, StereoAugmentor
from compress.data.readers import Transform, open_dataset
from compress.data.synthetic import SyntheticStereoDataset
from compress.errors import CheckpointError, ConfigError, DataError, FFSCError
from compress.metrics import MetricAccumulator
from teacher.inference import InputPadder
from teacher.outputs import StereoOutput

from .config import (
    DatasetSpec,
    DistillConfig,
    StudentSpec,
    TeacherSpec,
    config_to_dict,
    load_recipe,
)
from .label_cache import LabelCache, LabelledDataset, build_label_cache, cache_progress, file_sha256
from .losses import DistillLoss, FeatureAdapters, GroundTruth, TeacherTargets

__all__ = [
    "CHECKPOINT_NAME",
    "Callback",
    "DistillResult",
    "Trainer",
    "build_dataset",
    "build_student",
    "build_teacher",
    "distill",
    "evaluate_student",
    "load_distilled_student",
    "main",
    "save_distilled_student",
    "student_path",
]

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.yaml"
_CKPT_FORMAT = "ffsc-distill-checkpoint"
_STUDENT_FORMAT = "ffsc-student"

Callback = Callable[[str, int, dict[str, float]], None]
"""Called on rank 0 as callback(kind, step, metrics); kind is 'train', 'eval', 'checkpoint' or 'end'."""

# Keys that may change between a run and its resumption without changing what is being trained.
_RESUME_FREE = {
    "run_dir", "steps", "log_every", "checkpoint_every", "eval_every", "num_workers", "progress", "resume",
    "device", "teacher.build_cache", "teacher.cache.batch_size", "teacher.cache.flush_every",
}


# ------------------------------------------------------------------------------------------------ models


def _search_spaces() -> Any:
    try:
        return importlib.import_module("search_spaces")
    except ImportError:
        return None


def _space(*names: str) -> Any:
    space = _search_spaces()
    missing = [n for n in names if not hasattr(space, n)]
    if space is None or missing:
        raise ConfigError(
            f"student.kind 'search_space' needs search_spaces.{', '.join(missing or names)}, which this "
            "installation lacks; use kind 'foundation_stereo' or 'factory'"
        )
    return space


def build_student(spec: StudentSpec) -> nn.Module:
    """The student a StudentSpec describes (random init, or the weights of ``spec.init_checkpoint``)."""
    init = Path(spec.init_checkpoint) if spec.init_checkpoint else None
    try:
        if spec.kind == "search_space":
            if init is not None and init.is_dir():
                if spec.preset or spec.config:
                    raise ConfigError(
                        f"student.init_checkpoint {init} is a saved student folder, which fixes the architecture; "
                        "leave student.preset and student.config empty"
                    )
                return _space("load_student").load_student(init)
            space = _space("build_student", "StudentConfig", "preset")
            if spec.preset:
                cfg = space.preset(spec.preset, **spec.config)
            else:
                cfg = space.StudentConfig.from_dict(dict(spec.config))
            model = space.build_student(cfg)
        elif spec.kind == "foundation_stereo":
            from teacher import FoundationStereo, TeacherConfig

            model = FoundationStereo(TeacherConfig(**spec.config))
        else:
            module_name, _, fn_name = (spec.factory or "").partition(":")
            try:
                fn = getattr(importlib.import_module(module_name), fn_name)
            except (ImportError, AttributeError) as exc:
                raise ConfigError(f"student.factory {spec.factory!r} cannot be imported: {exc}") from None
            model = fn(**spec.config)
    except TypeError as exc:
        raise ConfigError(
            f"student.config {dict(spec.config)} does not fit student.kind {spec.kind!r}: {exc}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"the student builder returned {type(model).__name__}, expected a torch nn.Module")
    if init is not None:
        _load_strict(model, _student_state_dict(init), init)
    return model


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][:4]
        raise CheckpointError(f"{source} does not match the student: {' '.join(lines)}") from None


def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged or foreign files
        raise CheckpointError(f"{path} could not be read as a torch file: {exc}") from None


def _student_state_dict(path: Path) -> dict[str, torch.Tensor]:
    obj = _torch_load(path)
    if isinstance(obj, dict) and obj.get("format") == _STUDENT_FORMAT:
        return obj["state_dict"]
    if isinstance(obj, dict) and obj.get("format") == _CKPT_FORMAT:
        return obj["model"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise CheckpointError(f"{path} holds no student weights (expected a file written by ffsc distill)")


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def student_path(run_dir: str | os.PathLike, spec: StudentSpec) -> Path:
    """Where ``distill`` writes the student: a search-space folder ``student/`` or a file ``student.pt``."""
    return Path(run_dir) / ("student" if spec.kind == "search_space" else "student.pt")


def _student_config(model: nn.Module, spec: StudentSpec) -> dict[str, Any] | None:
    """A search-space student's config with its per-layer widths (pruned students rebuild exactly from it)."""
    cfg = getattr(_unwrap(model), "cfg", None)
    if spec.kind != "search_space" or cfg is None or not hasattr(cfg, "to_dict"):
        return None
    try:
        from search_spaces.serialization import record_layer_shapes
    except ImportError:
        return cfg.to_dict()
    return cfg.replace(layer_shapes=record_layer_shapes(_unwrap(model), cfg)).to_dict()


def save_distilled_student(model: nn.Module, spec: StudentSpec, path: str | os.PathLike) -> Path:
    """Write the student for evaluation and deployment: search-space students as a ``save_student`` folder
    (config with per-layer widths + safetensors), others as a torch file with their spec and weights."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = _unwrap(model)
    if spec.kind == "search_space":
        # Write a complete folder beside the target, then swap it in, so a crash never leaves half a student.
        tmp = path.with_name(f".{path.name}.tmp")
        old = path.with_name(f".{path.name}.old")
        for stale in (tmp, old):
            if stale.exists():
                shutil.rmtree(stale)
        _space("save_student").save_student(model, tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
        return path
    spec_dict = dataclasses.asdict(dataclasses.replace(spec, init_checkpoint=None))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _atomic_torch_save({"format": _STUDENT_FORMAT, "version": 1, "spec": spec_dict, "state_dict": state}, path)
    return path


def load_distilled_student(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """A student written by :func:`save_distilled_student` (or a distill checkpoint), in eval mode."""
    path = Path(path)
    if path.is_dir():
        return _space("load_student").load_student(path).to(device).eval()
    obj = _torch_load(path)
    if not isinstance(obj, dict) or obj.get("format") not in (_STUDENT_FORMAT, _CKPT_FORMAT):
        raise CheckpointError(
            f"{path} is not a student written by ffsc distill (a student.pt file, a student/ folder or a "
            "checkpoint.pt)"
        )
    if obj["format"] == _STUDENT_FORMAT:
        model = build_student(StudentSpec(**{**obj["spec"], "init_checkpoint": None}))
        _load_strict(model, obj["state_dict"], path)
    elif obj.get("student_config") is not None:
        space = _space("build_student", "StudentConfig")
        model = space.build_student(space.StudentConfig.from_dict(obj["student_config"]))
        _load_strict(model, obj["model"], path)
    else:
        spec = StudentSpec(**{**obj["config"]["student"], "init_checkpoint": None})
        model = build_student(spec)
        _load_strict(model, obj["model"], path)
    return model.to(device).eval()


def build_teacher(spec: TeacherSpec, device: str | torch.device = "cpu") -> nn.Module:
    """The frozen teacher of a TeacherSpec, in eval mode on ``device``."""
    from teacher import FoundationStereo, TeacherConfig, load_teacher

    try:
        tcfg = TeacherConfig(**spec.config) if spec.config else None
    except TypeError as exc:
        raise ConfigError(f"teacher.config {dict(spec.config)}: {exc}") from None
    # Building consumes the global RNG; keep the student's training stream independent of the teacher.
    with torch.random.fork_rng(devices=[]):
        if spec.checkpoint:
            model = load_teacher(spec.checkpoint, cfg=tcfg, device=device, trust_pickle=spec.trust_checkpoint)
        elif spec.allow_random_init:
            torch.manual_seed(spec.init_seed)
            model = FoundationStereo(tcfg or TeacherConfig()).to(device)
        else:
            raise ConfigError("teacher.checkpoint is not set (and teacher.allow_random_init is false)")
    model.eval().requires_grad_(False)
    return model


# -------------------------------------------------------------------------------------------------- data


def build_dataset(spec: DatasetSpec, transform: Transform | None = None, seed: int = 0) -> Dataset:
    """The dataset a DatasetSpec describes, with ``transform`` applied to every sample."""
    if spec.kind == "synthetic":
        n = spec.num_samples if spec.limit is None else min(spec.num_samples, spec.limit)
        return SyntheticStereoDataset(n, spec.synthetic, transform=transform, seed=seed)
    try:
        ds = open_dataset(spec.path, kind=spec.kind, transform=transform, seed=seed, **spec.options)
    except TypeError as exc:
        raise ConfigError(f"dataset options {dict(spec.options)} do not fit kind {spec.kind!r}: {exc}") from None
    if spec.limit is not None:
        if hasattr(ds, "records"):
            ds.records = ds.records[: spec.limit]
        else:
            return Subset(ds, range(min(spec.limit, len(ds))))
    return ds


class _ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way (at sample ``start`` of this rank's share)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` indices of this rank's share in the current epoch."""
        self.start = int(start)

    def __iter__(self):
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(device, non_blocking=True)
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        return v

    return {k: move(v) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------- evaluation


def _student_disparity(model: nn.Module, left: torch.Tensor, right: torch.Tensor, iters: int) -> torch.Tensor:
    padder = InputPadder(*left.shape[-2:])
    lp, rp = padder(left, right)
    out = model(lp, rp, iters=iters, test_mode=True)
    if isinstance(out, StereoOutput):
        out = out.disp
    return padder.unpad(out).float()


@torch.no_grad()
def evaluate_student(
    model: nn.Module,
    dataset: Dataset,
    *,
    iters: int,
    device: str | torch.device = "cpu",
    teacher: nn.Module | None = None,
    teacher_iters: int | None = None,
    teacher_disps: list[torch.Tensor] | None = None,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """EPE/D1/bad-pixel of the student against ground truth ('gt/...') and against the teacher ('teacher/...').

    The teacher's disparity comes from each item's ``teacher_disp`` (a LabelledDataset), from
    ``teacher_disps`` (one per item), or from running ``teacher``; without any, only 'gt/' metrics appear.
    Images of any size are padded to multiples of 32. The model's train/eval mode is restored afterwards.
    """
    from teacher import infer

    device = torch.device(device)
    was_training = model.training
    model.eval()
    gt_acc, t_acc = MetricAccumulator(), MetricAccumulator()
    autocast = (
        torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    )
    try:
        for i in tqdm(range(len(dataset)), desc="evaluating", disable=not progress, leave=False):
            item = dataset[i]
            left = item["left"][None].to(device)
            right = item["right"][None].to(device)
            with autocast:
                pred = _student_disparity(model, left, right, iters)
            pred = pred.cpu()
            if bool(item.get("has_gt", False)):
                gt_acc.update(pred, item["disp"][None], item["valid"][None])
            t_disp = None
            if "teacher_disp" in item:
                t_disp = item["teacher_disp"][None]
            elif teacher_disps is not None:
                t_disp = teacher_disps[i]
            elif teacher is not None:
                t_disp = infer(teacher, left, right, iters=teacher_iters).cpu()
            if t_disp is not None:
                t_acc.update(pred, t_disp.float())
    finally:
        model.train(was_training)
    out: dict[str, float] = {}
    if gt_acc.num_images and gt_acc.num_pixels:
        out.update({f"gt/{k}": v for k, v in gt_acc.compute().items()})
    if t_acc.num_images:
        out.update({f"teacher/{k}": v for k, v in t_acc.compute().items()})
    return out


# -------------------------------------------------------------------------------------- distributed


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def _setup_distributed(cfg: DistillConfig) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = cfg.device is None and torch.cuda.is_available() or (cfg.device or "").startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise ConfigError(f"device {cfg.device!r} requested but CUDA is not available")
    if want_cuda:
        device = torch.device("cuda", local) if world > 1 or cfg.device in (None, "cuda") else torch.device(cfg.device)
        torch.cuda.set_device(device)
    else:
        device = torch.device(cfg.device or "cpu")
    ctx = _Dist(rank=rank, world_size=world, local_rank=local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # Rank 0 may label a cache while the others wait, so allow long waits.
        dist.init_process_group(backend=backend, timeout=timedelta(hours=6))
        ctx.owns_group = True
    return ctx, device


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ------------------------------------------------------------------------------------------- RNG state


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------- pieces


class _Distiller(nn.Module):
    """Student plus loss (with its feature adapters) in one module, so DDP sees every trainable parameter."""

    def __init__(self, student: nn.Module, loss: DistillLoss) -> None:
        super().__init__()
        self.student = student
        self.loss = loss

    def forward(
        self,
        left: torch.Tensor,
        right: torch.Tensor,
        targets: TeacherTargets,
        gt: GroundTruth | None,
        iters: int,
        autocast: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with autocast():
            out = self.student(left, right, iters=iters, test_mode=False, return_intermediates=True)
        if not isinstance(out, StereoOutput):
            raise ConfigError(
                f"the student returned {type(out).__name__} for return_intermediates=True; distillation needs a "
                "StereoOutput"
            )
        with torch.autocast(device_type=left.device.type, enabled=False):
            return self.loss(out, targets, gt)


def _lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


@dataclass
class DistillResult:
    """What a distillation run produced."""

    run_dir: Path
    student_path: Path | None
    checkpoint_path: Path
    steps: int
    resumed_from: int | None = None
    train_losses: dict[str, float] = field(default_factory=dict)
    """Mean of each loss over the last logging window."""
    eval_metrics: dict[str, float] = field(default_factory=dict)
    """The final evaluation ('gt/epe', 'teacher/epe', ...)."""


# ---------------------------------------------------------------------------------------------- trainer


class Trainer:
    """Trains a student against a teacher as a DistillConfig says; see the module docstring."""

    def __init__(self, cfg: DistillConfig, callbacks: Iterable[Callback] = ()) -> None:
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.dist, self.device = _setup_distributed(cfg)
        self.run_dir = Path(cfg.run_dir)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        self.amp_dtype = None
        if self.device.type == "cuda" and cfg.amp != "off":
            self.amp_dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
        self.teacher: nn.Module | None = None
        self.teacher_iters: int | None = cfg.teacher.iters

        _seed_all(cfg.seed)
        self.student = build_student(cfg.student).to(self.device)
        self.cache = self._prepare_cache()
        if self.cache is None:
            self.teacher = self._teacher()
        self.train_set = self._train_set()
        self.eval_set, self.eval_teacher_disps = self._eval_set()
        self.feature_strides = self._feature_strides()
        adapters = self._discover_adapters() if cfg.loss.feature.enabled else FeatureAdapters([])
        self.loss = DistillLoss(cfg.loss, adapters).to(self.device)
        self.module = _Distiller(self.student, self.loss)
        self.model: nn.Module = self.module
        if self.dist.active:
            self.model = nn.parallel.DistributedDataParallel(
                self.module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.ddp_find_unused_parameters,
            )
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            functools.partial(
                _lr_factor, warmup=cfg.optim.warmup_steps, total=cfg.steps, min_ratio=cfg.optim.min_lr_ratio
            ),
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.sampler = _ResumableSampler(self.train_set, self.dist.world_size, self.dist.rank, cfg.seed)
        self.steps_per_epoch = len(self.sampler) // cfg.batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"the training set has {len(self.train_set)} samples, too few for batch_size {cfg.batch_size} on "
                f"{self.dist.world_size} process(es); lower batch_size or add data"
            )
        self.step = 0
        self.resumed_from: int | None = None
        # Training randomness differs per rank; model init above was identical on all of them.
        _seed_all(cfg.seed + 1 + self.dist.rank)
        ckpt = self.run_dir / CHECKPOINT_NAME
        if cfg.resume and ckpt.is_file():
            self._resume(ckpt)
        elif self.dist.is_main:
            self._truncate_log(0)  # a fresh run in an old run_dir starts a fresh log
        if self.dist.is_main:
            self._write_config()

    # ------------------------------------------------------------------------------ construction helpers

    def _teacher(self) -> nn.Module:
        if self.teacher is None:
            self.teacher = build_teacher(self.cfg.teacher, self.device)
            if self.teacher_iters is None:
                self.teacher_iters = int(getattr(getattr(self.teacher, "cfg", None), "valid_iters", 32))
        return self.teacher

    def _prepare_cache(self) -> LabelCache | None:
        spec = self.cfg.teacher
        if spec.label_cache is None:
            return None
        root = Path(spec.label_cache)
        state = cache_progress(root)
        if state is None or state[0] < state[1]:
            if not spec.build_cache:
                have = "no labels" if state is None else f"{state[0]} of {state[1]} samples labelled"
                raise ConfigError(
                    f"label cache {root} has {have}; label it first or set teacher.build_cache=true"
                )
            if self.dist.is_main:
                teacher = self._teacher()
                source = build_dataset(self.cfg.data.train, seed=self.cfg.seed)
                cache_cfg = dataclasses.replace(spec.cache, iters=spec.cache.iters or spec.iters)
                build_label_cache(
                    teacher, source, root, cache_cfg, checkpoint=spec.checkpoint, device=self.device,
                    progress=self.cfg.progress,
                )
            self.dist.barrier()
            self.teacher = None  # labelled; free it (eval builds it again only if it needs it)
        cache = LabelCache(root)
        want = dataclasses.replace(spec.cache, iters=spec.cache.iters or spec.iters).content_key()
        have = cache.manifest["labels"]
        differ = [
            f"{k}: cache {have.get(k)!r}, recipe {v!r}"
            for k, v in want.items()
            if not (v is None and k in ("iters", "size")) and have.get(k) != v
        ]
        if differ:
            raise ConfigError(
                f"label cache {root} holds other labels than teacher.cache asks for ({'; '.join(differ)}); "
                "match the recipe to the cache or label into a new folder"
            )
        if spec.checkpoint and cache.teacher.get("checkpoint_sha256"):
            if file_sha256(spec.checkpoint) != cache.teacher["checkpoint_sha256"]:
                raise ConfigError(
                    f"label cache {root} was made from another checkpoint than teacher.checkpoint "
                    f"{spec.checkpoint}; use a new cache folder"
                )
        return cache

    def _augment(self) -> Transform | None:
        d = self.cfg.data
        if d.crop_size is None and d.scale_prob == 0 and d.vflip_prob == 0 and d.jitter_prob == 0:
            return None
        return StereoAugmentor(
            AugmentConfig(
                crop_size=None if d.crop_size is None else tuple(d.crop_size),
                scale_prob=d.scale_prob,
                vflip_prob=d.vflip_prob,
                jitter_prob=d.jitter_prob,
            )
        )

    def _train_set(self) -> Dataset:
        d = self.cfg.data
        if self.cache is not None:
            source = build_dataset(d.train, seed=self.cfg.seed)
            return LabelledDataset(
                source, self.cache, crop_size=d.crop_size, jitter_prob=d.jitter_prob, seed=self.cfg.seed
            )
        return build_dataset(d.train, transform=self._augment(), seed=self.cfg.seed)

    def _eval_set(self) -> tuple[Dataset | None, list[torch.Tensor] | None]:
        d = self.cfg.data
        if d.eval_samples == 0 or not self.dist.is_main:
            return None, None
        if d.eval is None:
            if self.cache is not None:
                base = LabelledDataset(build_dataset(d.train, seed=self.cfg.seed), self.cache, seed=self.cfg.seed)
                return Subset(base, range(min(d.eval_samples, len(base)))), None
            base = build_dataset(d.train, seed=self.cfg.seed)
        else:
            base = build_dataset(d.eval, seed=self.cfg.seed)
        subset = Subset(base, range(min(d.eval_samples, len(base))))
        teacher = self.teacher
        if teacher is None and (self.cfg.teacher.checkpoint or self.cfg.teacher.allow_random_init):
            teacher = self._teacher()
        if teacher is None:
            return subset, None
        from teacher import infer

        # The eval set is fixed: run the teacher on it once, not at every evaluation.
        disps = []
        for i in range(len(subset)):
            item = subset[i]
            left, right = item["left"][None].to(self.device), item["right"][None].to(self.device)
            disps.append(infer(teacher, left, right, iters=self.teacher_iters).cpu())
        if self.cache is not None:
            self.teacher = None  # training reads the cache; keep no teacher in memory
        return subset, disps

    def _feature_strides(self) -> dict[int, int] | None:
        """Teacher level -> stride of the features the loss may use (None: a live teacher, all levels)."""
        levels = self.cfg.loss.feature.levels
        if self.cache is None:
            return None
        stored = self.cache.feature_strides
        if levels is None:
            return dict(stored)
        missing = [lv for lv in levels if lv not in stored]
        if missing and self.cfg.loss.feature.enabled:
            raise ConfigError(
                f"loss.feature.levels {list(levels)} asks for teacher levels {missing} that label cache "
                f"{self.cache.root} does not store (it has {sorted(stored)}); relabel with "
                "teacher.cache.feature_levels including them"
            )
        return {lv: stored[lv] for lv in levels}

    def _discover_adapters(self) -> FeatureAdapters:
        """One dry forward of the student (and of a live teacher) to match feature levels and widths."""
        item = self.train_set[0]
        shape = (1, *item["left"].shape)
        zeros = torch.zeros(shape, device=self.device)
        was_training = self.student.training
        self.student.eval()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), torch.no_grad():
            s_out = self.student(zeros, zeros, iters=1, test_mode=False, return_intermediates=True)
            if self.cache is not None:
                widths = {}
                for level, stride in (self.feature_strides or {}).items():
                    widths[stride] = int(self.cache.fields[f"feat_l{level}"]["shape"][0])
            else:
                t_out = self._teacher()(zeros, zeros, iters=1, test_mode=True, return_intermediates=True)
                targets = TeacherTargets.from_output(t_out, self.cfg.loss.feature.levels)
                widths = {s: int(f.shape[1]) for s, f in targets.features.items()}
        self.student.train(was_training)
        if not isinstance(s_out, StereoOutput):
            raise ConfigError("the student does not return a StereoOutput for return_intermediates=True")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + 1)
            adapters = FeatureAdapters.discover(s_out, widths)
        if not adapters.pairs and self.dist.is_main:
            warnings.warn(
                "loss.feature is enabled but no student feature level matches a teacher level by resolution "
                f"(teacher strides {sorted(widths)}); the feature loss will be 0",
                stacklevel=2,
            )
        return adapters.to(self.device)

    def _optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        decay, no_decay = [], []
        for p in self.module.parameters():
            if p.requires_grad:
                (decay if p.ndim > 1 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)

    def _write_config(self) -> None:
        import yaml

        atomic_write_text(self.run_dir / CONFIG_NAME, yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))

    # ------------------------------------------------------------------------------------ checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to resume (gathers the RNG states of all ranks)."""
        rng = _rng_state(self.device)
        if self.dist.active:
            states: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(states, rng)
        else:
            states = [rng]
        return {
            "format": _CKPT_FORMAT,
            "version": 1,
            "step": self.step,
            "world_size": self.dist.world_size,
            "config": config_to_dict(self.cfg),
            "model": {k: v.detach().cpu() for k, v in self.student.state_dict().items()},
            "student_config": _student_config(self.student, self.cfg.student),
            "adapters": self.loss.adapters.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": states,
        }

    def save_checkpoint(self) -> Path:
        """Write run_dir/checkpoint.pt atomically (rank 0); every rank must call it (RNG states are gathered)."""
        state = self.checkpoint_state()
        path = self.run_dir / CHECKPOINT_NAME
        if self.dist.is_main:
            _atomic_torch_save(state, path)
            self._emit("checkpoint", {"path": str(path)})
        self.dist.barrier()
        return path

    def _resume(self, path: Path) -> None:
        state = _torch_load(path)
        if not isinstance(state, dict) or state.get("format") != _CKPT_FORMAT:
            raise CheckpointError(f"{path} is not a distillation checkpoint; move it away or set resume=false")
        old = _flatten(state["config"])
        new = _flatten(config_to_dict(self.cfg))
        changed = sorted(k for k in set(old) | set(new) if k not in _RESUME_FREE and old.get(k) != new.get(k))
        if changed:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
            raise ConfigError(
                f"{path} was written by a run with another config ({shown}); use a new run_dir or set resume=false"
            )
        if state["world_size"] != self.dist.world_size:
            raise ConfigError(
                f"{path} was written by {state['world_size']} process(es), this run has {self.dist.world_size}; "
                "the data order would differ. Resume with the same number of processes"
            )
        _load_strict(self.student, state["model"], path)
        self.loss.adapters.load_state_dict(state["adapters"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"][self.dist.rank], self.device)
        self.step = int(state["step"])
        self.resumed_from = self.step
        if self.dist.is_main:
            self._truncate_log(self.step)

    # ---------------------------------------------------------------------------------------- logging

    def _emit(self, kind: str, metrics: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        row = {"kind": kind, "step": self.step, **metrics}
        with (self.run_dir / METRICS_NAME).open("a") as f:
            f.write(json.dumps(row) + "\n")
        for cb in self.callbacks:
            cb(kind, self.step, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    def _truncate_log(self, step: int) -> None:
        """Drop log rows past the checkpoint: the resumed run writes them again."""
        path = self.run_dir / METRICS_NAME
        if not path.is_file():
            return
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))

    # --------------------------------------------------------------------------------------- training

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _targets(self, batch: dict[str, Any], left: torch.Tensor, right: torch.Tensor) -> TeacherTargets:
        if self.cache is not None:
            targets = TeacherTargets.from_batch(batch)
            allowed = set((self.feature_strides or {}).values())
            targets.features = {s: f for s, f in targets.features.items() if s in allowed}
            return targets
        with torch.no_grad(), self._autocast():
            out = self._teacher()(left, right, iters=self.teacher_iters, test_mode=True, return_intermediates=True)
        return TeacherTargets.from_output(out, self.cfg.loss.feature.levels)

    def train_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One optimisation step on one batch; returns the (detached) loss parts."""
        cfg = self.cfg
        batch = _to_device(batch, self.device)
        left, right = batch["left"], batch["right"]
        if left.shape[-1] % 32 or left.shape[-2] % 32:
            raise DataError(
                f"training images are {left.shape[-1]}x{left.shape[-2]}; the models need multiples of 32 "
                "(set data.crop_size)"
            )
        targets = self._targets(batch, left, right)
        gt = GroundTruth.from_batch(batch)
        total, parts = self.model(left, right, targets, gt, cfg.train_iters, self._autocast)
        self.scaler.scale(total).backward()
        if cfg.optim.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return {"total": total.detach(), **parts}

    def _reduce(self, sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
        keys = sorted(sums)
        vec = torch.stack([sums[k].float() for k in keys]) / max(count, 1)
        if self.dist.active:
            dist.all_reduce(vec)
            vec /= self.dist.world_size
        return {f"loss/{k}": float(v) for k, v in zip(keys, vec.tolist(), strict=True)}

    def evaluate(self) -> dict[str, float]:
        """Evaluate the student on the eval set (rank 0; the others wait)."""
        metrics: dict[str, float] = {}
        if self.dist.is_main and self.eval_set is not None:
            metrics = evaluate_student(
                self.student, self.eval_set, iters=self.cfg.eval_iters, device=self.device,
                teacher_disps=self.eval_teacher_disps, amp_dtype=self.amp_dtype,
            )
            self._emit("eval", {f"eval/{k}": v for k, v in metrics.items()})
        self.dist.barrier()
        return metrics

    def train(self) -> DistillResult:
        """Train up to cfg.steps (from the resumed step), checkpointing and evaluating on the way."""
        cfg = self.cfg
        self.module.train()
        if self.teacher is not None:
            self.teacher.eval()
        show = cfg.progress and self.dist.is_main
        bar = tqdm(total=cfg.steps, initial=self.step, desc="distilling", disable=not show)
        sums: dict[str, torch.Tensor] = {}
        count, window_start = 0, time.perf_counter()
        last_losses: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        try:
            while self.step < cfg.steps:
                epoch, offset = divmod(self.step, self.steps_per_epoch)
                self.sampler.set_epoch(epoch)
                self.sampler.set_start(offset * cfg.batch_size)
                if hasattr(self.train_set, "set_epoch"):
                    self.train_set.set_epoch(epoch)
                loader = DataLoader(
                    self.train_set,
                    batch_size=cfg.batch_size,
                    sampler=self.sampler,
                    num_workers=cfg.num_workers,
                    drop_last=True,
                    pin_memory=self.device.type == "cuda",
                    generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch),
                )
                for batch in loader:
                    parts = self.train_step(batch)
                    for k, v in parts.items():
                        sums[k] = sums.get(k, 0) + v
                    count += 1
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        last_losses = self._reduce(sums, count)
                        if not math.isfinite(last_losses["loss/total"]):
                            raise FFSCError(
                                f"the distillation loss became {last_losses['loss/total']} by step {self.step}; "
                                "lower optim.lr, enable optim.grad_clip or use amp=bf16"
                            )
                        elapsed = time.perf_counter() - window_start
                        rate = count * cfg.batch_size * self.dist.world_size / max(elapsed, 1e-9)
                        self._emit(
                            "train",
                            {**last_losses, "lr": self.scheduler.get_last_lr()[0], "epoch": epoch,
                             "samples_per_s": rate},
                        )
                        bar.set_postfix(loss=f"{last_losses['loss/total']:.4g}")
                        sums, count, window_start = {}, 0, time.perf_counter()
                    # Evaluate before checkpointing so a resumed run never repeats or skips an evaluation.
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                        last_eval = self.evaluate()
                    if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                        self.save_checkpoint()
                    if self.step >= cfg.steps:
                        break
        finally:
            bar.close()
        last_eval = self.evaluate()
        ckpt = self.save_checkpoint()
        saved = None
        if self.dist.is_main:
            saved = save_distilled_student(self.student, cfg.student, student_path(self.run_dir, cfg.student))
            self._emit("end", {"student": str(saved)})
        self.dist.barrier()
        return DistillResult(
            run_dir=self.run_dir,
            student_path=saved,
            checkpoint_path=ckpt,
            steps=self.step,
            resumed_from=self.resumed_from,
            train_losses=last_losses,
            eval_metrics=last_eval,
        )

    def close(self) -> None:
        """Leave the process group if this trainer created it."""
        if self.dist.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def distill(cfg: DistillConfig, callbacks: Iterable[Callback] = ()) -> DistillResult:
    """Run a distillation recipe end to end (resuming from run_dir when a checkpoint is there)."""
    trainer = Trainer(cfg, callbacks)
    try:
        return trainer.train()
    finally:
        trainer.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m compress.distill.trainer RECIPE.yaml key=value ...`` (also under torchrun)."""
    parser = argparse.ArgumentParser(prog="ffsc distill", description="distil a student from the teacher")
    parser.add_argument("recipe", nargs="?", help="YAML recipe (see recipes/distill.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=100 optim.lr=1e-4")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    args = parser.parse_args(argv)
    recipe = args.recipe
    overrides = list(args.overrides)
    if recipe is not None and "=" in recipe and not Path(recipe).is_file():
        overrides.insert(0, recipe)
        recipe = None
    try:
        result = distill(load_recipe(recipe, overrides))
    except FFSCError as exc:
        if args.debug:
            raise
        print(f"ffsc distill: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {**result.train_losses, **{f"eval/{k}": v for k, v in result.eval_metrics.items()}}
        print(json.dumps({"student": str(result.student_path), "steps": result.steps, **summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
