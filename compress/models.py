"""Models in one place: what a ``--model`` value names, and the students and teachers a recipe spec describes.

``resolve_model`` resolves, in this order: a directory (a saved student, or a teacher saved by ``ffsc prune``),
a ``.pt`` file written by ``ffsc distill`` (a non-search-space student or a distillation checkpoint), a
``.pth``/``.pt``/``.safetensors`` file (a teacher checkpoint with its ``cfg.yaml``), an ``.onnx`` file or a
TensorRT engine (where files are allowed), a student preset (``NAME`` or ``preset:NAME``, random weights), or
``teacher:<vit>`` (a teacher with random weights, for timing). ``search_spaces.load_student`` is the low-level
loader of a saved student folder underneath.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from compress.atomic import atomic_write
from compress.errors import CheckpointError, ConfigError
from compress.teacher_ref import TeacherRef
from search_spaces import PRESETS, StudentConfig, StudentStereo, build_student, load_student, preset, save_student
from search_spaces.serialization import load_model
from teacher import FoundationStereo, TeacherConfig, load_teacher
from teacher.inference import model_iters

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")
STUDENT_FORMAT = "ffsc-student"
DISTILL_CHECKPOINT_FORMAT = "ffsc-distill-checkpoint"
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
TEACHER_PREFIX = "teacher:"
PRESET_PREFIX = "preset:"


@dataclass
class ResolvedModel:
    """What a ``--model`` value named: a PyTorch module or an exported file, and how it was found."""

    kind: str
    """"student" (saved directory), "teacher" (checkpoint or pruned-teacher directory), "preset", "random-teacher",
    "onnx" or "engine"."""
    description: str
    module: object | None = None
    path: Path | None = None
    default_iters: int | None = None

    @property
    def is_teacher(self) -> bool:
        """Whether the module is a FoundationStereo teacher."""
        return self.kind in ("teacher", "random-teacher")


def resolve_model(
    spec: str | os.PathLike,
    config: TeacherConfig | str | None = None,
    trust_checkpoint: bool = False,
    allow_files: bool = False,
    seed: int = 0,
) -> ResolvedModel:
    """Resolve a model spec (see the module docstring for the order); modules come back on the CPU, in eval mode."""
    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        model = load_model(path)
        if isinstance(model, StudentStereo):
            return ResolvedModel("student", f"student directory {path} ({model.cfg.name})", model, path,
                                 model_iters(model))
        return ResolvedModel("teacher", f"pruned teacher directory {path} (FoundationStereo {model.cfg.vit_size})",
                             model, path, model_iters(model))
    if path.is_file() and path.suffix == ".pt":
        try:
            obj = torch_load(path)
        except CheckpointError:
            obj = None  # not tensors only (e.g. a pickled teacher checkpoint): load_teacher decides below
        if isinstance(obj, dict) and obj.get("format") in (STUDENT_FORMAT, DISTILL_CHECKPOINT_FORMAT):
            model = _distilled_from_file(path, obj).eval()
            iters = getattr(getattr(model, "cfg", None), "iters", None)
            return ResolvedModel("student", f"distilled student {path}", model, path, iters)
    if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
        model = load_teacher(path, cfg=config, trust_pickle=trust_checkpoint)
        return ResolvedModel("teacher", f"teacher checkpoint {path} (FoundationStereo {model.cfg.vit_size})", model,
                             path, model_iters(model))
    if path.is_file() and allow_files and path.suffix == ".onnx":
        return ResolvedModel("onnx", f"ONNX file {path}", path=path, default_iters=_onnx_iters(path))
    if path.is_file() and allow_files and path.suffix in ENGINE_SUFFIXES:
        return ResolvedModel("engine", f"TensorRT engine {path}", path=path, default_iters=_engine_iters(path))

    spec = spec.removeprefix(PRESET_PREFIX)
    if spec in PRESETS:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = build_student(preset(spec)).eval()
        return ResolvedModel("preset", f"student preset {spec} (random weights, seed {seed})", model,
                             default_iters=model_iters(model))
    if spec.startswith(TEACHER_PREFIX):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = FoundationStereo(TeacherConfig(vit_size=spec[len(TEACHER_PREFIX):])).eval()
        return ResolvedModel("random-teacher", f"FoundationStereo {model.cfg.vit_size} (random weights, seed {seed})",
                             model, default_iters=model_iters(model))
    files = "an .onnx file, a TensorRT engine, " if allow_files else ""
    if path.is_file():
        raise CheckpointError(f"--model {spec}: unsupported file type '{path.suffix}'; expected {files}a teacher "
                              f"checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}) or a saved model directory")
    if path.suffix or "/" in spec:
        raise CheckpointError(f"--model {spec}: no such file or directory; expected {files}a saved student or "
                              f"pruned-teacher directory, or a teacher checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})")
    raise ConfigError(f"--model {spec!r} is not {files}a saved student or pruned-teacher directory, a teacher "
                      f"checkpoint, a preset ({', '.join(PRESETS)}, optionally as preset:NAME) or "
                      "teacher:<vits|vitb|vitl>")


def _onnx_iters(path: Path) -> int | None:
    # compress.export loads onnx (about 1.5 s): kept out of import compress.deploy and ffsc --help
    from compress.export import read_metadata

    value = read_metadata(path).get("iters")
    return int(value) if value else None


def _engine_iters(path: Path) -> int | None:
    # compress.export loads onnx (about 1.5 s): kept out of import compress.deploy and ffsc --help
    from compress.export import read_sidecar

    info = read_sidecar(path)
    return info.iters if info is not None else None


# ------------------------------------------------------------------------------------- models of a recipe


def student_from_spec(spec: Any) -> nn.Module:
    """The student a compress.distill StudentSpec describes (random init, or ``spec.init_checkpoint``'s weights)."""
    init = Path(spec.init_checkpoint) if spec.init_checkpoint else None
    try:
        if spec.kind == "search_space":
            if init is not None and init.is_dir():
                if spec.preset or spec.config:
                    raise ConfigError(
                        f"student.init_checkpoint {init} is a saved student folder, which fixes the architecture; "
                        "leave student.preset and student.config empty"
                    )
                return load_student(init)
            cfg = preset(spec.preset, **spec.config) if spec.preset else StudentConfig.from_dict(dict(spec.config))
            model = build_student(cfg, pretrained=init is None)
        elif spec.kind == "foundation_stereo":
            model = FoundationStereo(TeacherConfig(**spec.config))
        else:
            module_name, _, fn_name = (spec.factory or "").partition(":")
            try:
                fn = getattr(importlib.import_module(module_name), fn_name)
            except (ImportError, AttributeError) as exc:
                raise ConfigError(f"student.factory {spec.factory!r} cannot be imported: {exc}") from None
            model = fn(**spec.config)
    except TypeError as exc:
        raise ConfigError(f"student.config {dict(spec.config)} does not fit kind {spec.kind!r}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"the student builder returned {type(model).__name__}, expected a torch nn.Module")
    if init is not None:
        load_strict(model, _student_state_dict(init), init)
    return model


def teacher_from_spec(spec: TeacherRef, device: str | torch.device = "cpu") -> nn.Module:
    """The frozen FoundationStereo teacher a recipe's ``teacher`` names (its checkpoint, or ``stand_in: random``),
    in eval mode on ``device``."""
    tcfg = spec.architecture()
    # Building consumes the global RNG; keep the student's training stream independent of the teacher.
    with torch.random.fork_rng(devices=[]):
        if spec.checkpoint:
            model = load_teacher(spec.checkpoint, cfg=tcfg, device=device, trust_pickle=spec.trust_checkpoint)
        elif spec.stand_in == "random":
            if isinstance(tcfg, str):
                tcfg = TeacherConfig.from_yaml(tcfg)
            torch.manual_seed(spec.init_seed)
            model = FoundationStereo(tcfg or TeacherConfig()).to(device)
        else:
            raise ConfigError("teacher.checkpoint is not set (and teacher.stand_in is not 'random')")
    model.eval().requires_grad_(False)
    return model


def student_path(run_dir: str | os.PathLike, spec: Any) -> Path:
    """Where ``distill`` writes the student: a search-space folder ``student/`` or a file ``student.pt``."""
    return Path(run_dir) / ("student" if spec.kind == "search_space" else "student.pt")


def save_distilled_student(model: nn.Module, spec: Any, path: str | os.PathLike) -> Path:
    """Write the student for evaluation and deployment: search-space students as a ``save_student`` folder
    (config with per-layer widths + safetensors), others as a torch file with their spec and weights."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if spec.kind == "search_space":
        # Write a complete folder beside the target, then swap it in, so a crash never leaves half a student.
        tmp = path.with_name(f".{path.name}.tmp")
        old = path.with_name(f".{path.name}.old")
        for stale in (tmp, old):
            if stale.exists():
                shutil.rmtree(stale)
        save_student(model, tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
        return path
    spec_dict = dataclasses.asdict(dataclasses.replace(spec, init_checkpoint=None))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: torch.save(
        {"format": STUDENT_FORMAT, "version": 1, "spec": spec_dict, "state_dict": state}, tmp))
    return path


def _distilled_from_file(path: Path, obj: dict[str, Any]) -> nn.Module:
    """The student in a file ``ffsc distill`` wrote: a ``student.pt`` or a ``checkpoint.pt``."""
    if obj.get("student_config") is not None:
        model = build_student(StudentConfig.from_dict(obj["student_config"]), pretrained=False)
    else:  # the StudentSpec fields the file was written with
        spec = obj["spec"] if obj["format"] == STUDENT_FORMAT else obj["config"]["student"]
        model = student_from_spec(SimpleNamespace(**{**spec, "init_checkpoint": None}))
    load_strict(model, _student_state_dict(path, obj), path)
    return model


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load ``state`` into ``model`` exactly, or raise one CheckpointError naming the mismatch."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][:4]
        raise CheckpointError(f"{source} does not match the student: {' '.join(lines)}") from None


def torch_load(path: Path) -> Any:
    """A torch file of tensors (``weights_only``), or one CheckpointError when it is missing or unreadable."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged or foreign files
        raise CheckpointError(f"{path} could not be read as a torch file: {exc}") from None


def _student_state_dict(path: Path, obj: Any = None) -> dict[str, torch.Tensor]:
    obj = torch_load(path) if obj is None else obj
    if isinstance(obj, dict) and obj.get("format") in (STUDENT_FORMAT, DISTILL_CHECKPOINT_FORMAT):
        return obj["state_dict" if obj["format"] == STUDENT_FORMAT else "model"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise CheckpointError(f"{path} holds no student weights (expected a file written by ffsc distill)")
