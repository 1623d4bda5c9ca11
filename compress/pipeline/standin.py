"""The stand-in teacher: a small student trained on procedural stereo with exact ground truth, for users without
the official FoundationStereo checkpoint.

One is shipped in ``teacher/standin/`` (config, weights and ``training.json``, which records the
recipe, the texture photographs' hashes, the machine and the losses); ``ffsc teacher train-standin
recipes/standin_teacher.yaml --out DIR`` reproduces it. Training is resumable: a state file every
``checkpoint_every`` steps, and each step's batch is a pure function of (seed, step).

The scenes (``compress.data.synthetic``) are layered slanted planes and shapes with whole-pixel disparities and
exact occlusions, textured with crops of photographs (scikit-image's bundled ones by default, the Middlebury
motorcycle excluded: it is the held-out real pair of ``benchmarks/real_pairs.py``) or procedural noise; each
sample draws its disparity range, and the right view may get its own colour jitter (a camera mismatch).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import default_collate

from compress.atomic import atomic_write, atomic_write_text, sha256_file
from compress.checks import check_size, require_at_least
from compress.data import DatasetSpec
from compress.data.augment import AugmentConfig, StereoAugmentor
from compress.data.io import read_image, write_image
from compress.data.synthetic import SKIMAGE_TEXTURES, SyntheticConfig, SyntheticStereoDataset, skimage_photos
from compress.distill.config import OutputLossConfig
from compress.distill.losses import GroundTruth, TeacherTargets, output_loss
from compress.errors import CheckpointError, ConfigError, DataError
from compress.evaluation import evaluate_student
from compress.machine import machine_info
from compress.structured import load_structured, to_plain
from compress.teacher_ref import StandInTraining, standin_optim
from compress.training import build_optimizer, build_scheduler, fit, to_device
from search_spaces import build_student, load_student, preset, save_student
from search_spaces.serialization import WEIGHTS_NAME

SHIPPED_DIR = Path(str(files("teacher") / "standin"))
"""Where the shipped stand-in teacher lives (a saved student directory, package data of search_spaces)."""


_GT_LOSS = OutputLossConfig(weight=0.0, gt_weight=1.0, init_weight=0.5, max_disp=None)
_OPTIM_KEYS = ("lr", "weight_decay", "grad_clip")
"""The stand-in recipe's optimiser keys before they moved under ``optim``."""


@dataclass
class StandInRecipe(StandInTraining):
    """How the stand-in teacher is trained: model preset, procedural data, augmentation and schedule (the preset,
    steps, batch and optimiser in the words of a run recipe's ``teacher.train``)."""

    RENAMED: ClassVar[dict[str, str]] = {"crop": "crop_size", **{key: f"optim.{key}" for key in _OPTIM_KEYS}}
    WHERE: ClassVar[str] = ""

    preset: str = "standin_teacher"
    textures: str | None = "skimage"
    """'skimage' (scikit-image's bundled photographs, exported next to the weights), a folder of photographs, or
    null (procedural textures only)."""
    data: DatasetSpec = field(default_factory=lambda: DatasetSpec(kind="synthetic", num_samples=1, synthetic=(
        SyntheticConfig(height=256, width=320, max_disp=128, max_disp_low=16, num_objects=6, photo_prob=0.6,
                        object_size=(0.08, 0.35), object_slope=0.1, max_slope=0.3))))
    """The scene generator; ``num_samples`` is ignored (every step draws fresh scenes)."""
    eval: DatasetSpec = field(default_factory=lambda: DatasetSpec(kind="synthetic", num_samples=16))
    """Held-out scenes (the generator above with this spec's seed and count unless it sets its own)."""
    crop_size: list[int] | None = field(default_factory=lambda: [128, 320])
    """[height, width] random training crop, multiples of 32 (full-width crops keep the whole disparity range)."""
    jitter_prob: float = 0.8
    asymmetric_prob: float = 0.5
    """Given jitter, the probability that the right view gets its own (a camera mismatch)."""
    steps: int = 1500
    batch_size: int = 2
    seed: int = 0
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        require_at_least("checkpoint_every", self.checkpoint_every, 1)
        check_size("crop_size", self.crop_size)
        syn = self.data.synthetic
        if self.crop_size is not None and (self.crop_size[0] > syn.height or self.crop_size[1] > syn.width):
            raise ConfigError(f"crop_size {self.crop_size} is larger than the scenes ({syn.height}x{syn.width})")


def load_standin_recipe(path: str | Path | None, overrides: list[str] | None = None) -> StandInRecipe:
    """The stand-in recipe in ``path`` (None: the defaults), with key=value overrides."""
    return load_structured(StandInRecipe, path, overrides or [], what="stand-in teacher recipe")


def gt_loss(model: nn.Module, batch: dict[str, Any], device: torch.device,
            iters: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The supervised loss of a stereo model against ground truth (sequence loss + initial disparity)."""
    batch = to_device(batch, device)
    gt = GroundTruth.from_batch(batch)
    out = model(batch["left"], batch["right"], iters=iters, return_intermediates=True)
    parts = output_loss(out, TeacherTargets(disp=gt.disp), gt, _GT_LOSS)
    return parts["output_gt"] + parts["init"], parts


class GroundTruthTrainer:
    """A stand-in teacher trained on ground truth: its model, optimiser, schedule and losses. The one algorithm of
    ``ffsc teacher train-standin`` and of a run's ``teacher.stand_in: train``; each hands it its own batches."""

    def __init__(self, training: StandInTraining, seed: int, device: torch.device) -> None:
        torch.manual_seed(seed)
        self.cfg = preset(training.preset, **training.overrides)
        self.model = build_student(self.cfg).to(device).train()
        self.optim, self.steps, self.device = training.optim, training.steps, device
        self.key = f"{training.WHERE}optim.lr"
        self.optimizer = build_optimizer(self.model.parameters(), self.optim)
        self.scheduler = build_scheduler(self.optimizer, self.optim, self.steps)
        self.losses: list[float] = []

    def state_dict(self) -> dict[str, Any]:
        """Model, optimiser, schedule and losses, to resume from."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "losses": self.losses}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from what :meth:`state_dict` returned."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.losses = list(state["losses"])

    def fit(self, batches: Iterable[dict[str, Any]], start: int = 0, after_step: Callable[[int], None] | None = None,
            desc: str = "stand-in teacher", progress: bool = True) -> None:
        """Train from step ``start`` to the last one; a non-finite loss stops it with the key to lower."""

        def on_step(step: int, total: torch.Tensor, parts: dict[str, torch.Tensor]) -> dict[str, str]:
            self.losses.append(float(total))
            if not math.isfinite(self.losses[-1]):
                raise DataError(f"the stand-in teacher's loss is not finite at step {step}; lower {self.key} "
                                f"({self.optim.lr})")
            if after_step is not None:
                after_step(step)
            return {"loss": f"{np.mean(self.losses[-20:]):.3f}"}

        fit(self.model.parameters(), lambda b: gt_loss(self.model, b, self.device, self.cfg.iters), batches,
            self.optimizer, self.scheduler, steps=self.steps, start=start, grad_clip=self.optim.grad_clip,
            on_step=on_step, desc=desc, progress=progress)
        self.model.eval()


def _recorded(recipe: dict[str, Any]) -> dict[str, Any]:
    """A recipe recorded in an old state file (``crop``; optimiser keys not yet under ``optim``), in today's keys."""
    recipe = dict(recipe)
    if "crop" in recipe:
        recipe["crop_size"] = recipe.pop("crop")
    if "optim" in recipe:
        return recipe
    moved = {k: recipe[k] for k in _OPTIM_KEYS if k in recipe}
    rest = {k: v for k, v in recipe.items() if k not in moved}
    return {**rest, "optim": to_plain(dataclasses.replace(standin_optim(), **moved))}


def export_skimage_textures(out_dir: Path) -> dict[str, str]:
    """Write scikit-image's bundled photographs in SKIMAGE_TEXTURES as PNGs; returns {file: sha256}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for name, img in zip(SKIMAGE_TEXTURES, skimage_photos(), strict=True):
        path = out_dir / f"{name}.png"
        write_image(path, img)
        hashes[path.name] = hashlib.sha256(img.tobytes()).hexdigest()
    return hashes


def _skimage_version() -> str:
    import skimage  # optional (ffsc[real]) and slow to import: only when its photographs were used

    return skimage.__version__


def _texture_hashes(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(np.ascontiguousarray(read_image(f)).tobytes()).hexdigest()
            for f in sorted(folder.iterdir()) if f.is_file()}


def _datasets(recipe: StandInRecipe, texture_dir: str | None) -> tuple[SyntheticStereoDataset, SyntheticStereoDataset]:
    syn = dataclasses.replace(recipe.data.synthetic, texture_dir=texture_dir)
    aug = StereoAugmentor(AugmentConfig(crop_size=None if recipe.crop_size is None else tuple(recipe.crop_size),
                                        jitter_prob=recipe.jitter_prob, asymmetric_prob=recipe.asymmetric_prob))
    train = SyntheticStereoDataset(recipe.steps * recipe.batch_size, syn, transform=aug, seed=recipe.seed)
    eval_syn = dataclasses.replace(syn, seed=recipe.eval.synthetic.seed if recipe.eval.synthetic.seed != syn.seed
                                   else syn.seed + 1000)
    return train, SyntheticStereoDataset(recipe.eval.num_samples, eval_syn, seed=recipe.seed)


def train_standin(recipe: StandInRecipe, out_dir: str | Path, device: torch.device,
                  progress: bool = True) -> Path:
    """Train the stand-in teacher into ``out_dir`` (a saved student plus ``training.json``); resumes a stopped run."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texture_dir, hashes = None, {}
    if recipe.textures == "skimage":
        texture_dir = out_dir / "textures"
        hashes = export_skimage_textures(texture_dir)
    elif recipe.textures:
        texture_dir = Path(recipe.textures).expanduser()
        if not texture_dir.is_dir():
            raise ConfigError(f"textures: {recipe.textures!r} is not a folder of photographs")
        hashes = _texture_hashes(texture_dir)
    train_set, eval_set = _datasets(recipe, None if texture_dir is None else str(texture_dir))

    trainer = GroundTruthTrainer(recipe, recipe.seed, device)
    state_file = out_dir / "train_state.pt"
    start, seconds = 0, 0.0
    if state_file.is_file():
        state = torch.load(state_file, map_location=device, weights_only=False)
        if _recorded(state["recipe"]) != to_plain(recipe):
            raise ConfigError(f"{state_file} was written by a different recipe; delete it (or use another --out) "
                              "to train this one from the start")
        trainer.load_state_dict(state)
        start, seconds = state["step"], state["seconds"]

    def batches():
        for step in range(start, recipe.steps):
            base = step * recipe.batch_size
            yield default_collate([train_set[base + k] for k in range(recipe.batch_size)])

    def save_state(step: int) -> None:
        if step % recipe.checkpoint_every == 0 and step < recipe.steps:
            state = {"recipe": to_plain(recipe), **trainer.state_dict(), "step": step,
                     "seconds": seconds + time.perf_counter() - t0}
            atomic_write(state_file, lambda tmp: torch.save(state, tmp))

    t0 = time.perf_counter()
    trainer.fit(batches(), start=start, after_step=save_state, progress=progress)
    seconds += time.perf_counter() - t0
    model, losses = trainer.model, trainer.losses
    metrics = evaluate_student(model, eval_set, iters=trainer.cfg.iters, device=device)
    save_student(model, out_dir)
    record = {
        "recipe": to_plain(recipe), "textures": hashes, "steps": recipe.steps, "train_seconds": seconds,
        "machine": machine_info(), "torch": torch.__version__, "python": platform.python_version(),
        "loss_every_50": [float(np.mean(losses[i:i + 50])) for i in range(0, len(losses), 50)],
        "scikit_image": _skimage_version() if recipe.textures == "skimage" else None,
        "threads": torch.get_num_threads(),
        "eval": {"scenes": f"{eval_set.n} held-out scenes of the training generator (seed {eval_set.config.seed})",
                 **metrics},
    }
    atomic_write_text(out_dir / "training.json", json.dumps(record, indent=2, default=str))
    state_file.unlink(missing_ok=True)
    return out_dir


def weights_digest(path: Path) -> str:
    """sha256 of a saved student's weights file (the stand-in's identity in label caches)."""
    return sha256_file(Path(path) / WEIGHTS_NAME)


def load_standin(where: str, device: torch.device) -> tuple[nn.Module, Path]:
    """The stand-in teacher named by ``where``: 'shipped' or a saved student directory."""
    path = SHIPPED_DIR if where == "shipped" else Path(where).expanduser()
    try:
        return load_student(path, device=device), path
    except CheckpointError as exc:
        hint = ("the shipped stand-in teacher is missing from this copy of ffsc; set teacher.stand_in: train"
                if where == "shipped" else "teacher.stand_in must be 'shipped', 'train' or a saved student folder")
        raise CheckpointError(f"{exc} ({hint})") from None
