"""Models in one place: what a ``--model`` value names, and the students and teachers a recipe spec describes.

``resolve_model`` resolves, in this order: a directory (a saved student, or a teacher saved by ``ffsc prune``),
a ``.pt`` file written by ``ffsc distill`` (a non-search-space student or a distillation checkpoint), a
``.pth``/``.pt``/``.safetensors`` file (a teacher checkpoint with its ``cfg.yaml``), an ``.onnx`` file or a
TensorRT engine (where files are allowed), a student preset (``NAME`` or ``preset:NAME``, random weights), or
``teacher:<vit>`` (a teacher with random weights, for timing). ``search_spaces.load_student`` is the low-level
loader of a saved student folder underneath.

A recipe names its student with the same words: ``StudentSpec.model`` is a ``--model`` value, resolved by
``resolve_model`` in ``student_from_spec``; ``StudentSpec`` adds the architectures a recipe may build instead.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from torch import nn

from compress.atomic import atomic_write
from compress.errors import CheckpointError, ConfigError
from compress.structured import translate_renamed
from compress.teacher_ref import TeacherRef
from search_spaces import PRESETS, StudentConfig, StudentStereo, build_student, preset, save_student
from search_spaces.serialization import load_model
from teacher import FoundationStereo, TeacherConfig, load_teacher
from teacher.config import VIT_SIZES
from teacher.inference import model_iters

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")
STUDENT_FORMAT = "ffsc-student"
DISTILL_CHECKPOINT_FORMAT = "ffsc-distill-checkpoint"
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
TEACHER_PREFIX = "teacher:"
PRESET_PREFIX = "preset:"
STUDENT_KINDS = ("search_space", "foundation_stereo", "factory")


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
    key: str = "--model",
) -> ResolvedModel:
    """Resolve a model spec (see the module docstring for the order); modules come back on the CPU, in eval mode.

    ``key`` names the setting in error messages (``--model``, or a recipe's ``student.model``)."""
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
        description, iters = _onnx_file(path)
        return ResolvedModel("onnx", description, path=path, default_iters=iters)
    if path.is_file() and allow_files and path.suffix in ENGINE_SUFFIXES:
        return ResolvedModel("engine", f"TensorRT engine {path}", path=path, default_iters=_engine_iters(path))

    check_model_name(spec, key, allow_files)  # an unknown name or path: one line, before anything is built
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
    raise AssertionError(f"check_model_name passed {spec!r}")  # every name it passes is resolved above


def check_model_name(spec: str | os.PathLike, key: str = "--model", allow_files: bool = False) -> None:
    """Raise the one-line error resolve_model would, without building or reading anything, when ``spec`` is neither
    an existing file or folder nor a name it builds (a preset, ``preset:NAME``, ``teacher:<vit>``)."""
    spec = str(spec)
    path = Path(spec)
    if path.is_dir() or (path.is_file() and (path.suffix in CHECKPOINT_SUFFIXES or (allow_files and (
            path.suffix == ".onnx" or path.suffix in ENGINE_SUFFIXES)))):
        return
    if spec.removeprefix(PRESET_PREFIX) in PRESETS:
        return
    if spec.startswith(TEACHER_PREFIX):
        vit = spec[len(TEACHER_PREFIX):]
        if vit in VIT_SIZES:
            return
        raise ConfigError(f"{key} {spec!r}: unknown ViT size {vit!r}; expected teacher:<{'|'.join(VIT_SIZES)}>")
    files = "an .onnx file, a TensorRT engine, " if allow_files else ""
    if path.is_file():
        raise CheckpointError(f"{key} {spec}: unsupported file type '{path.suffix}'; expected {files}a teacher "
                              f"checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}) or a saved model directory")
    if path.suffix or "/" in spec:
        raise CheckpointError(f"{key} {spec}: no such file or directory; expected {files}a saved student or "
                              f"pruned-teacher directory, or a teacher checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})")
    raise ConfigError(f"{key} {spec.removeprefix(PRESET_PREFIX)!r} is not {files}a saved student or pruned-teacher "
                      f"directory, a teacher checkpoint, a preset ({', '.join(PRESETS)}, optionally as preset:NAME) "
                      f"or teacher:<{'|'.join(VIT_SIZES)}>")


def _onnx_file(path: Path) -> tuple[str, int | None]:
    """(description, recorded iteration count) of an ONNX stereo model; one line when its inputs or
    output are not the ones ffsc feeds and reads."""
    # compress.export loads onnx (about 1.5 s): kept out of import compress.deploy and ffsc --help
    from compress.export.onnx_export import NOT_FFSC, check_stereo_onnx, exported_by_ffsc, load_graph, read_metadata

    graph = load_graph(path)  # one line for a damaged file
    check_stereo_onnx(graph, path)
    meta = read_metadata(graph)
    origin = "" if exported_by_ffsc(meta) else f", which {NOT_FFSC}; inputs 'left' and 'right' (RGB 0..255) assumed"
    value = meta.get("iters")
    return f"ONNX file {path}{origin}", int(value) if value else None


def _engine_iters(path: Path) -> int | None:
    # compress.export loads onnx (about 1.5 s): kept out of import compress.deploy and ffsc --help
    from compress.export import read_sidecar

    info = read_sidecar(path)
    return info.iters if info is not None else None


# ------------------------------------------------------------------------------------- models of a recipe


@dataclass
class StudentSpec:
    """The student: a model reference, an architecture to build, or both.

    ``model`` names a model the way ``--model`` does (``compress.models.resolve_model``: a saved student or
    pruned-teacher folder, a ``.pt`` written by ``ffsc distill``, a teacher checkpoint, a preset ``NAME`` or
    ``preset:NAME``, ``teacher:<vit>``). Without an architecture below it is the student, weights and all; with
    one, its weights initialise that architecture (strictly). The architecture: kind 'search_space':
    ``search_spaces.build_student`` of ``preset`` (a ``search_spaces.PRESETS`` name) with ``config`` overriding
    its fields, or of ``StudentConfig(**config)`` without a preset; 'foundation_stereo': a (smaller)
    FoundationStereo from TeacherConfig fields in ``config``; 'factory': ``factory`` is
    ``"package.module:function"`` called with ``**config``, returning an nn.Module with the model contract.
    """

    RENAMED: ClassVar[dict[str, str]] = {"init_checkpoint": "model"}

    kind: str = "search_space"
    preset: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    factory: str | None = None
    model: str | None = None
    """A ``--model`` value to start from; e.g. a saved (pruned) student folder, which fixes the architecture when
    preset and config are empty. None = random init of the architecture."""

    def __post_init__(self) -> None:
        if self.kind not in STUDENT_KINDS:
            raise ConfigError(f"student.kind: got {self.kind!r}, expected one of {STUDENT_KINDS}")
        if self.preset is not None and self.kind != "search_space":
            raise ConfigError(f"student.preset is only for kind 'search_space', got kind {self.kind!r}")
        if self.kind == "factory" and (not self.factory or ":" not in self.factory):
            raise ConfigError(
                f"student.factory: got {self.factory!r}; kind 'factory' needs 'package.module:function'"
            )


def student_from_spec(spec: Any, seed: int = 0) -> nn.Module:
    """The student a StudentSpec describes: its ``model`` (resolved as ``--model`` is), or its architecture with
    random init or with ``model``'s weights; ``seed`` seeds a preset or random teacher that ``model`` names."""
    if spec.model is not None and not _builds_architecture(spec):
        named = resolve_model(spec.model, seed=seed, key="student.model")
        _check_kind(spec, named)
        return named.module
    try:
        if spec.kind == "search_space":
            cfg = preset(spec.preset, **spec.config) if spec.preset else StudentConfig.from_dict(dict(spec.config))
            model = build_student(cfg, pretrained=spec.model is None)
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
    if spec.model is not None:
        with torch.random.fork_rng(devices=[]):  # weights only: the run's random stream stays as without them
            named = resolve_model(spec.model, seed=seed, key="student.model")
        load_strict(model, named.module.state_dict(), f"student.model {spec.model} ({named.description})")
    return model


def _builds_architecture(spec: Any) -> bool:
    """Whether the spec's preset/config/factory give the architecture (``model`` then gives its weights only)."""
    return spec.kind == "factory" or spec.preset is not None or bool(spec.config)


def _check_kind(spec: Any, named: ResolvedModel) -> None:
    """A model that is the student must be of the spec's kind (it decides how ``distill`` saves the student)."""
    kind = ("search_space" if isinstance(named.module, StudentStereo)
            else "foundation_stereo" if isinstance(named.module, FoundationStereo) else "factory")
    if kind != spec.kind:
        hint = (f"set student.kind={kind}" if kind != "factory" else
                "set student.kind=factory with the student.factory that builds it")
        raise ConfigError(f"student.model {spec.model}: a {named.description} is not a student of kind "
                          f"{spec.kind!r}; {hint}")


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
    spec_dict = vars(_architecture(dataclasses.asdict(spec)))
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
        model = student_from_spec(_architecture(spec))
    load_strict(model, obj["state_dict" if obj["format"] == STUDENT_FORMAT else "model"], path)
    return model


def _architecture(fields: dict[str, Any]) -> SimpleNamespace:
    """StudentSpec fields (a record's, old keys read as today's) that rebuild the architecture only: ``model`` is
    kept where it is the architecture, dropped where it gave weights alone (the saved weights replace them)."""
    spec = SimpleNamespace(**translate_renamed(StudentSpec, fields))
    if _builds_architecture(spec):
        spec.model = None
    return spec


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

