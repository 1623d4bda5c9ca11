"""The teacher stage: load the official checkpoint, or train a small stand-in on ground truth."""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from compress.data.datasets import build_dataset
from compress.errors import DataError
from search_spaces import load_student, save_student
from teacher import load_teacher

from .recipe import RunRecipe
from .standin import GroundTruthTrainer, load_standin, weights_digest


@dataclass
class TeacherInfo:
    """The teacher model and how it was obtained."""

    model: nn.Module
    description: str
    identity: dict[str, Any]
    trained_here: bool
    path: Path | None

    @property
    def is_student(self) -> bool:
        """Whether the teacher is of the student family (a stand-in, saved as a student folder)."""
        return self.identity.get("kind") != "foundation_stereo"


def _official(recipe: RunRecipe, device: torch.device) -> TeacherInfo:
    spec = recipe.teacher
    model = load_teacher(spec.checkpoint, cfg=spec.architecture(), device=device, trust_pickle=spec.trust_checkpoint)
    identity = {"kind": "foundation_stereo", "checkpoint": str(spec.checkpoint), **model.cfg.to_dict()}
    return TeacherInfo(model, f"FoundationStereo {model.cfg.vit_size} from {spec.checkpoint}", identity, False,
                       Path(spec.checkpoint))


def train_fallback_teacher(recipe: RunRecipe, out_dir: Path, device: torch.device) -> TeacherInfo:
    """Train the stand-in teacher on the training set's ground truth (reused when already in ``out_dir``)."""
    spec = recipe.teacher.train
    done = out_dir / "teacher.json"
    if done.is_file():
        model = load_student(out_dir, device=device)
        info = json.loads(done.read_text())
        return TeacherInfo(model, info["description"], info["identity"], True, out_dir)

    trainer = GroundTruthTrainer(spec, recipe.seed, device)
    dataset = build_dataset(recipe.data.train, seed=recipe.seed)
    probe = dataset[0]
    if not bool(probe.get("has_gt", False)):
        raise DataError(
            "no teacher checkpoint and the training data has no ground truth to train a stand-in teacher on; "
            "set teacher.checkpoint to the official FoundationStereo model"
        )
    loader = DataLoader(dataset, batch_size=spec.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(recipe.seed))
    if len(loader) == 0:
        raise DataError(f"the training set has {len(dataset)} samples, fewer than teacher.train.batch_size "
                        f"{spec.batch_size}; lower it or add data")
    start = time.perf_counter()
    epochs = itertools.chain.from_iterable(itertools.repeat(loader))  # reshuffled by the generator each pass
    trainer.fit(epochs, desc="teacher (ground truth)", progress=recipe.progress)
    model, losses = trainer.model, trainer.losses
    save_student(model, out_dir)
    description = (f"stand-in teacher '{spec.preset}' trained here on ground truth for {spec.steps} "
                   f"steps ({time.perf_counter() - start:.0f} s; no official checkpoint given)")
    identity = {"kind": "stand_in", "preset": spec.preset, "steps": spec.steps, "seed": recipe.seed}
    done.write_text(json.dumps({"description": description, "identity": identity,
                                "final_loss": sum(losses[-10:]) / len(losses[-10:])}, indent=2))
    return TeacherInfo(model, description, identity, True, out_dir)


def shipped_or_saved_teacher(where: str, device: torch.device) -> TeacherInfo:
    """A stand-in teacher trained before this run: the shipped one ('shipped') or a saved student folder."""
    model, path = load_standin(where, device)
    record = path / "training.json"
    steps = json.loads(record.read_text()).get("steps") if record.is_file() else None
    name = "shipped stand-in teacher" if where == "shipped" else f"stand-in teacher from {path}"
    description = (f"{name} '{model.cfg.name}'" + (f" ({steps} steps on procedural scenes)" if steps else "")
                   + "; no official checkpoint given")
    identity = {"kind": "stand_in", "preset": model.cfg.name, "weights_sha256": weights_digest(path)}
    return TeacherInfo(model, description, identity, False, path)


def get_teacher(recipe: RunRecipe, run_dir: Path, device: torch.device) -> TeacherInfo:
    """The recipe's teacher: the official checkpoint when given, else the stand-in that teacher.stand_in names."""
    if recipe.teacher.checkpoint:
        return _official(recipe, device)
    if recipe.teacher.stand_in == "train":
        return train_fallback_teacher(recipe, run_dir / "teacher", device)
    return shipped_or_saved_teacher(recipe.teacher.stand_in, device)
