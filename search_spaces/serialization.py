"""Save and load stereo models as config + state dict (never a pickled module), pruned widths included.

Students: ``config.yaml`` (a StudentConfig whose ``layer_shapes`` records every width pruning changed) and
``model.safetensors``. Pruned teachers: the teacher's ``cfg.yaml``, ``layer_shapes.json`` and
``model.safetensors``. Both rebuild from their config, resize the recorded layers, then load strictly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from compress.atomic import atomic_write, atomic_write_text
from compress.errors import CheckpointError
from teacher.config import TeacherConfig
from teacher.loading import check_state_dict, read_state_dict, take_state_dict
from teacher.model import FoundationStereo

from .config import StudentConfig
from .layer_shapes import apply_layer_shapes, tensor_shapes, width_attrs
from .model import StudentStereo, build_student

CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"
TEACHER_CONFIG_NAME = "cfg.yaml"
SHAPES_NAME = "layer_shapes.json"

def record_layer_shapes(model: nn.Module, reference: StudentConfig | nn.Module) -> dict[str, dict[str, Any]]:
    """Per-module widths and tensor shapes of ``model`` that differ from ``reference``.

    ``reference`` is the unpruned architecture: a module built the way the loader will build it (on the meta
    device is enough), or a StudentConfig, whose student is built without layer overrides.
    """
    if isinstance(reference, StudentConfig):
        with torch.device("meta"):
            reference = StudentStereo(reference.replace(layer_shapes={}))
    ref_modules = dict(reference.named_modules())
    shapes: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        ref = ref_modules.get(name)
        if ref is None:
            continue
        own, attrs = tensor_shapes(module), width_attrs(module)
        if own != tensor_shapes(ref) or attrs != width_attrs(ref):
            shapes[name] = {"tensors": own, "attrs": attrs}
    return shapes


def save_student(model: StudentStereo, path: str | Path) -> Path:
    """Write ``config.yaml`` (with per-layer widths) and ``model.safetensors`` into the directory ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg.replace(layer_shapes=record_layer_shapes(model, model.cfg))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp)))
    cfg.to_yaml(path / CONFIG_NAME)
    return path


def load_student(path: str | Path, device: str | torch.device = "cpu") -> StudentStereo:
    """Rebuild a saved student exactly (also after pruning) and load its weights strictly."""
    path = Path(path)
    cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.is_file() or not weights.is_file():
        raise CheckpointError(
            f"{path} is not a saved student: expected {CONFIG_NAME} and {WEIGHTS_NAME} in that directory"
        )
    cfg = StudentConfig.from_yaml(cfg_file)
    model = build_student(cfg, pretrained=False)

    state = read_state_dict(weights)  # clear errors for damaged files, NaN/Inf weights named

    check_state_dict(model, state, str(weights))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # Cloned: safetensors refuses tensors that share memory (the teacher registers some norms twice).
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def save_pruned_teacher(model: nn.Module, path: str | Path) -> Path:
    """Write a (pruned) FoundationStereo as ``cfg.yaml`` + ``layer_shapes.json`` + ``model.safetensors``."""
    if not isinstance(model, FoundationStereo):
        raise CheckpointError(f"save_pruned_teacher expects a FoundationStereo, got {type(model).__name__}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        reference = FoundationStereo(model.cfg)
    shapes = record_layer_shapes(model, reference)
    state = _tensors(model)
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp)))
    atomic_write_text(path / SHAPES_NAME, json.dumps(shapes, indent=1, sort_keys=True))
    model.cfg.to_yaml(path / TEACHER_CONFIG_NAME)
    return path


def load_pruned_teacher(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a teacher saved by :func:`save_pruned_teacher` exactly and load its weights strictly."""
    path = Path(path)
    files = [path / TEACHER_CONFIG_NAME, path / SHAPES_NAME, path / WEIGHTS_NAME]
    if not all(f.is_file() for f in files):
        raise CheckpointError(
            f"{path} is not a saved pruned teacher: expected {', '.join(f.name for f in files)} in that directory"
        )
    try:
        shapes = json.loads(files[1].read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{files[1]} is not valid JSON: {exc}") from None
    model = FoundationStereo(TeacherConfig.from_yaml(files[0]))
    apply_layer_shapes(model, shapes)
    state = take_state_dict(files[2])  # a preflight's read of it moments ago is not repeated
    check_state_dict(model, state, str(files[2]))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def save_model(model: nn.Module, path: str | Path) -> Path:
    """Save a student (:func:`save_student`) or a teacher (:func:`save_pruned_teacher`) into directory ``path``."""
    if isinstance(model, StudentStereo):
        return save_student(model, path)
    return save_pruned_teacher(model, path)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load whatever :func:`save_model` wrote into ``path`` (a student or a pruned teacher)."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return load_student(path, device)
    if (path / SHAPES_NAME).is_file():
        return load_pruned_teacher(path, device)
    raise CheckpointError(
        f"{path} holds neither a saved student ({CONFIG_NAME} + {WEIGHTS_NAME}) nor a saved pruned teacher "
        f"({TEACHER_CONFIG_NAME} + {SHAPES_NAME} + {WEIGHTS_NAME})"
    )
