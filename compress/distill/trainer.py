"""Distillation trainer: a student learns from cached teacher labels or a live teacher, on one or many processes.

``distill(cfg)`` runs a whole recipe; :class:`Trainer` exposes the pieces. The steps themselves are
``compress.training.fit``. Under ``torchrun`` (``torchrun --nproc_per_node=2 -m compress.cli distill RECIPE``) it
trains with DistributedDataParallel (NCCL on GPU, gloo on CPU); only rank 0 writes logs, checkpoints and the student.

Reproducibility: the data order is a function of (seed, step) only (a DistributedSampler reshuffled per
epoch, resumed mid-epoch by skipping the batches already seen), augmentation draws from (seed, epoch,
index), and checkpoints hold the model, adapters, optimizer, scheduler, grad scaler and every RNG state. A
run killed after a checkpoint and resumed therefore ends bitwise equal to an uninterrupted one on CPU.

Over the project's ~500-line guide on purpose: the Trainer's set-up, DDP, checkpoint/resume and loop hooks share
one state (student, adapters, optimizer, scheduler, scaler, sampler, step, RNG) that a checkpoint must capture
whole. Datasets, evaluation, models and the step loop itself live in their own modules.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from compress.atomic import atomic_write, atomic_write_text
from compress.data.datasets import ResumableSampler, augmentor, build_dataset
from compress.device import local_cuda_index, pick_device
from compress.errors import CheckpointError, ConfigError, DataError, FFSCError
from compress.evaluation import evaluate_student
from compress.models import (
    DISTILL_CHECKPOINT_FORMAT,
    load_strict,
    save_distilled_student,
    student_from_spec,
    student_path,
    teacher_from_spec,
    torch_load,
)
from compress.structured import flatten, translate_renamed
from compress.terminal import console
from compress.training import (
    autocast,
    build_optimizer,
    build_scheduler,
    fit,
    rng_state,
    seed_all,
    set_rng_state,
    to_device,
)
from search_spaces.serialization import record_layer_shapes
from teacher.inference import infer, model_iters
from teacher.outputs import StereoOutput
from teacher.stages import use_precision

from .config import DistillConfig, StudentSpec, config_to_dict
from .label_cache import LabelCache, LabelledDataset, build_label_cache, cache_progress, file_sha256
from .losses import DistillLoss, FeatureAdapters, GroundTruth, TeacherTargets

__all__ = ["CHECKPOINT_NAME", "Callback", "DistillResult", "Trainer", "distill"]

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.yaml"

Callback = Callable[[str, int, dict[str, float]], None]
"""Called on rank 0 as callback(kind, step, metrics); kind is 'train', 'eval', 'checkpoint' or 'end'."""

# Keys that may change between a run and its resumption without changing what is being trained.
_RESUME_FREE = {
    "run_dir", "steps", "log_every", "checkpoint_every", "eval_every", "num_workers", "progress", "resume",
    "device", "data.labels.build", "data.labels.batch_size", "data.labels.flush_every",
}


def _student_config(model: nn.Module, spec: StudentSpec) -> dict[str, Any] | None:
    """A search-space student's config with its per-layer widths (pruned students rebuild exactly from it)."""
    cfg = getattr(model, "cfg", None)
    if spec.kind != "search_space" or cfg is None or not hasattr(cfg, "to_dict"):
        return None
    return cfg.replace(layer_shapes=record_layer_shapes(model, cfg)).to_dict()


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
    device = pick_device(cfg.device)
    if device.type == "cuda":
        if world > 1:
            device = torch.device("cuda", local_cuda_index())  # one GPU per process, whatever the recipe named
        torch.cuda.set_device(device)
    ctx = _Dist(rank=rank, world_size=world, local_rank=local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # Rank 0 may label a cache while the others wait, so allow long waits.
        dist.init_process_group(backend=backend, timeout=timedelta(hours=6))
        ctx.owns_group = True
    return ctx, device


class _StudentWithLoss(nn.Module):
    """Student plus loss (with its feature adapters) in one module, so DDP sees every trainable parameter."""

    def __init__(self, student: nn.Module, loss: DistillLoss) -> None:
        super().__init__()
        self.student = student
        self.loss = loss

    def forward(self, left: torch.Tensor, right: torch.Tensor, targets: TeacherTargets, gt: GroundTruth | None,
                iters: int, amp: Callable[[], Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with amp():
            out = self.student(left, right, iters=iters, test_mode=False, return_intermediates=True)
        if not isinstance(out, StereoOutput):
            raise ConfigError(
                f"the student returned {type(out).__name__} for return_intermediates=True; distillation needs a "
                "StereoOutput"
            )
        with torch.autocast(device_type=left.device.type, enabled=False):
            return self.loss(out, targets, gt)


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
        self.amp_dtype = None  # the student's and live teacher's autocast dtype (None: float32, as on CPU)
        if self.device.type == "cuda" and cfg.amp != "off":
            self.amp_dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
        self.teacher: nn.Module | None = None
        self.teacher_iters: int | None = cfg.teacher.iters

        seed_all(cfg.seed)
        self.student = student_from_spec(cfg.student, seed=cfg.seed).to(self.device)
        self.cache = self._prepare_cache()
        if self.cache is None:
            self.teacher = self._teacher()
        self.train_set = self._train_set()
        self.eval_set, self.eval_teacher_disps = self._eval_set()
        self.feature_strides = self._feature_strides()
        adapters = self._discover_adapters() if cfg.loss.feature.enabled else FeatureAdapters([])
        self.loss = DistillLoss(cfg.loss, adapters).to(self.device)
        self.module = _StudentWithLoss(self.student, self.loss)
        self.model: nn.Module = self.module
        if self.dist.active:
            self.model = nn.parallel.DistributedDataParallel(
                self.module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.ddp_find_unused_parameters,
            )
        self.optimizer = build_optimizer(self.module.parameters(), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.sampler = ResumableSampler(self.train_set, self.dist.world_size, self.dist.rank, cfg.seed)
        self.steps_per_epoch = len(self.sampler) // cfg.batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"the training set has {len(self.train_set)} samples, too few for batch_size {cfg.batch_size} on "
                f"{self.dist.world_size} process(es); lower batch_size or add data"
            )
        self.step = 0
        self.resumed_from: int | None = None
        # Training randomness differs per rank; model init above was identical on all of them.
        seed_all(cfg.seed + 1 + self.dist.rank)
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
            self.teacher = teacher_from_spec(self.cfg.teacher, self.device)
            self.teacher_iters = model_iters(self.teacher, self.teacher_iters, key="teacher.iters")
        return self.teacher

    def _prepare_cache(self) -> LabelCache | None:
        spec, labels = self.cfg.teacher, self.cfg.data.labels
        if labels.folder is None:
            return None
        root = Path(labels.folder)
        state = cache_progress(root)
        if state is None or state[0] < state[1]:
            if not labels.build:
                have = "no labels" if state is None else f"{state[0]} of {state[1]} samples labelled"
                raise ConfigError(
                    f"label cache {root} has {have}; label it first or set data.labels.build=true"
                )
            if self.dist.is_main:
                teacher = self._teacher()
                source = build_dataset(self.cfg.data.train, seed=self.cfg.seed)
                build_label_cache(
                    teacher, source, root, labels, iters=spec.iters, size=self.cfg.data.size,
                    checkpoint=spec.checkpoint, device=self.device, progress=self.cfg.progress,
                )
            self.dist.barrier()
            self.teacher = None  # labelled; free it (eval builds it again only if it needs it)
        cache = LabelCache(root)
        want = {**labels.content_key(), "iters": spec.iters, "size": self.cfg.data.size}
        have = cache.manifest["labels"]
        differ = [
            f"{k}: cache {have.get(k)!r}, recipe {v!r}"
            for k, v in want.items()
            if not (v is None and k in ("iters", "size")) and have.get(k) != v
        ]
        if differ:
            raise ConfigError(
                f"label cache {root} holds other labels than data.labels, teacher.iters and data.size ask for "
                f"({'; '.join(differ)}); match the recipe to the cache or label into a new folder"
            )
        if spec.checkpoint and cache.teacher.get("checkpoint_sha256"):
            if file_sha256(spec.checkpoint) != cache.teacher["checkpoint_sha256"]:
                raise ConfigError(
                    f"label cache {root} was made from another checkpoint than teacher.checkpoint "
                    f"{spec.checkpoint}; use a new cache folder"
                )
        return cache

    def _train_set(self) -> Dataset:
        d, seed = self.cfg.data, self.cfg.seed
        if self.cache is not None:  # cached labels are cropped and jittered with their images
            source = build_dataset(d.train, seed=seed)
            return LabelledDataset(source, self.cache, crop_size=d.crop_size, jitter_prob=d.jitter_prob, seed=seed)
        return build_dataset(d.train, transform=augmentor(d), seed=seed)

    def _eval_set(self) -> tuple[Dataset | None, list[torch.Tensor] | None]:
        d, seed = self.cfg.data, self.cfg.seed
        if d.eval_samples == 0 or not self.dist.is_main:
            return None, None
        if d.eval is None and self.cache is not None:  # the cached labels carry the teacher's disparity
            base = LabelledDataset(build_dataset(d.train, seed=seed), self.cache, seed=seed)
            return Subset(base, range(min(d.eval_samples, len(base)))), None
        base = build_dataset(d.train if d.eval is None else d.eval, seed=seed)
        subset = Subset(base, range(min(d.eval_samples, len(base))))
        teacher = self.teacher
        if teacher is None and (self.cfg.teacher.checkpoint or self.cfg.teacher.stand_in == "random"):
            teacher = self._teacher()
        if teacher is None:
            return subset, None
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
                "data.labels.feature_levels including them"
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

    def _write_config(self) -> None:
        atomic_write_text(self.run_dir / CONFIG_NAME, yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))

    # ------------------------------------------------------------------------------------ checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to resume (gathers the RNG states of all ranks)."""
        rng = rng_state(self.device)
        if self.dist.active:
            states: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(states, rng)
        else:
            states = [rng]
        return {
            "format": DISTILL_CHECKPOINT_FORMAT,
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
            atomic_write(path, lambda tmp: torch.save(state, tmp))
            self._emit("checkpoint", {"path": str(path)})
        self.dist.barrier()
        return path

    def _resume(self, path: Path) -> None:
        state = torch_load(path)
        if not isinstance(state, dict) or state.get("format") != DISTILL_CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} is not a distillation checkpoint; move it away or set resume=false")
        old = translate_renamed(DistillConfig, flatten(state["config"]))  # written before keys were renamed
        if old.get("teacher.config") == {}:  # TeacherSpec's "none" before TeacherRef's None
            old["teacher.config"] = None
        new = flatten(config_to_dict(self.cfg))
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
        load_strict(self.student, state["model"], path)
        self.loss.adapters.load_state_dict(state["adapters"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][self.dist.rank], self.device)
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

    @property
    def precision(self) -> str:
        """The precision the models' stages run in: amp_dtype's, or fp32 (their own mixed_precision never decides)."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, "fp32")

    @contextlib.contextmanager
    def _amp(self, model: nn.Module) -> Iterator[None]:
        """Autocast in amp_dtype, with ``model``'s stages told the same: a model's own fp16 autocast would override
        the caller's (bf16 training in fp16 without a GradScaler, or amp 'off' not off)."""
        with autocast(self.device, self.amp_dtype), use_precision(model, self.precision):
            yield

    def _targets(self, batch: dict[str, Any], left: torch.Tensor, right: torch.Tensor) -> TeacherTargets:
        if self.cache is not None:
            targets = TeacherTargets.from_batch(batch)
            allowed = set((self.feature_strides or {}).values())
            targets.features = {s: f for s, f in targets.features.items() if s in allowed}
            return targets
        teacher = self._teacher()
        with torch.no_grad(), self._amp(teacher):
            out = teacher(left, right, iters=self.teacher_iters, test_mode=True, return_intermediates=True)
        return TeacherTargets.from_output(out, self.cfg.loss.feature.levels)

    def batch_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The distillation loss of one batch (with gradients) and its (detached) parts."""
        batch = to_device(batch, self.device)
        left, right = batch["left"], batch["right"]
        if left.shape[-1] % 32 or left.shape[-2] % 32:
            raise DataError(
                f"training images are {left.shape[-2]}x{left.shape[-1]} (height x width); the models need multiples "
                "of 32 (set data.crop_size)"
            )
        targets = self._targets(batch, left, right)
        return self.model(left, right, targets, GroundTruth.from_batch(batch), self.cfg.train_iters,
                          functools.partial(self._amp, self.student))

    def batches(self) -> Iterator[dict[str, Any]]:
        """Training batches from the current step on, epoch after epoch: the order depends on (seed, step) only."""
        cfg = self.cfg
        while True:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch)
            self.sampler.set_start(offset * cfg.batch_size)
            if hasattr(self.train_set, "set_epoch"):
                self.train_set.set_epoch(epoch)
            yield from DataLoader(self.train_set, batch_size=cfg.batch_size, sampler=self.sampler, drop_last=True,
                                  num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
                                  generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))

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
            with use_precision(self.student, self.precision):
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
        window: dict[str, Any] = {"sums": {}, "count": 0, "start": time.perf_counter()}
        last_losses: dict[str, float] = {}

        def after_step(step: int, total: torch.Tensor, parts: dict[str, torch.Tensor]) -> dict[str, str] | None:
            nonlocal last_losses
            self.step, postfix = step, None
            sums = window["sums"]
            for k, v in {"total": total, **parts}.items():
                sums[k] = sums.get(k, 0) + v
            window["count"] += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                last_losses = self._reduce(sums, window["count"])
                if not math.isfinite(last_losses["loss/total"]):
                    raise FFSCError(
                        f"the distillation loss became {last_losses['loss/total']} by step {step}; "
                        "lower optim.lr, enable optim.grad_clip or use amp=bf16"
                    )
                elapsed = time.perf_counter() - window["start"]
                rate = window["count"] * cfg.batch_size * self.dist.world_size / max(elapsed, 1e-9)
                self._emit("train", {**last_losses, "lr": self.scheduler.get_last_lr()[0],
                                     "epoch": (step - 1) // self.steps_per_epoch, "samples_per_s": rate})
                postfix = {"loss": f"{last_losses['loss/total']:.4g}"}
                window.update(sums={}, count=0, start=time.perf_counter())
            # Evaluate before checkpointing so a resumed run never repeats or skips an evaluation.
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                self.evaluate()
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                self.save_checkpoint()
            return postfix

        if self.resumed_from is not None and self.dist.is_main:  # said even without progress: steps run again
            console().print(f"distilling in {self.run_dir}: resuming from step {self.step} of {cfg.steps}, its last "
                            f"checkpoint (every {cfg.checkpoint_every} steps); any steps after it run again")
        fit(self.module.parameters(), self.batch_loss, self.batches(), self.optimizer, self.scheduler, steps=cfg.steps,
            start=self.step, grad_clip=cfg.optim.grad_clip, scaler=self.scaler, on_step=after_step,
            desc="distilling", progress=cfg.progress and self.dist.is_main)
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
