"""What a ``--model`` value names, resolved to a module (or an exported file) in one place.

Resolved in this order: a directory (a saved student, or a teacher saved by ``ffsc prune``), a
``.pth``/``.safetensors`` file (a teacher checkpoint with its ``cfg.yaml``), an ``.onnx`` file or a TensorRT
engine (where files are allowed), a student preset (``NAME`` or ``preset:NAME``, random weights), or
``teacher:<vit>`` (a teacher with random weights, for timing).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compress.errors import CheckpointError, ConfigError

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")
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
    spec: str,
    config: str | None = None,
    trust_checkpoint: bool = False,
    allow_files: bool = False,
    seed: int = 0,
) -> ResolvedModel:
    """Resolve a model spec (see the module docstring for the order); modules come back on the CPU, in eval mode."""
    import torch

    path = Path(spec)
    if path.is_dir():
        from search_spaces import StudentStereo
        from search_spaces.serialization import load_model

        model = load_model(path)
        if isinstance(model, StudentStereo):
            return ResolvedModel("student", f"student directory {path} ({model.cfg.name})", model, path,
                                 model.cfg.iters)
        return ResolvedModel("teacher", f"pruned teacher directory {path} (FoundationStereo {model.cfg.vit_size})",
                             model, path, model.cfg.valid_iters)
    if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
        from teacher import load_teacher

        model = load_teacher(path, cfg=config, trust_pickle=trust_checkpoint)
        return ResolvedModel("teacher", f"teacher checkpoint {path} (FoundationStereo {model.cfg.vit_size})", model,
                             path, model.cfg.valid_iters)
    if path.is_file() and allow_files and path.suffix == ".onnx":
        return ResolvedModel("onnx", f"ONNX file {path}", path=path, default_iters=_onnx_iters(path))
    if path.is_file() and allow_files and path.suffix in ENGINE_SUFFIXES:
        return ResolvedModel("engine", f"TensorRT engine {path}", path=path, default_iters=_engine_iters(path))

    from search_spaces import PRESETS, build_student, preset

    spec = spec.removeprefix(PRESET_PREFIX)
    if spec in PRESETS:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = build_student(preset(spec)).eval()
        return ResolvedModel("preset", f"student preset {spec} (random weights, seed {seed})", model,
                             default_iters=model.cfg.iters)
    if spec.startswith(TEACHER_PREFIX):
        from teacher import FoundationStereo, TeacherConfig

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = FoundationStereo(TeacherConfig(vit_size=spec[len(TEACHER_PREFIX):])).eval()
        return ResolvedModel("random-teacher", f"FoundationStereo {model.cfg.vit_size} (random weights, seed {seed})",
                             model, default_iters=model.cfg.valid_iters)
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
    from compress.export import read_metadata

    value = read_metadata(path).get("iters")
    return int(value) if value else None


def _engine_iters(path: Path) -> int | None:
    from compress.export import read_sidecar

    info = read_sidecar(path)
    return info.iters if info is not None else None
