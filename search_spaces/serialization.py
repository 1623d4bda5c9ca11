"""Save and load students as config + state dict (never a pickled module), pruned widths included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.atomic import atomic_write
from compress.errors import CheckpointError

from .config import StudentConfig
from .model import StudentStereo

CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"

# Module attributes that carry a width; recorded when pruning changed them.
_WIDTH_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
                "normalized_shape", "num_heads")


def build_student(cfg: StudentConfig) -> StudentStereo:
    """The student network for a config, with any recorded per-layer widths applied."""
    model = StudentStereo(cfg)
    if cfg.layer_shapes:
        apply_layer_shapes(model, cfg.layer_shapes)
    return model


def record_layer_shapes(model: nn.Module, cfg: StudentConfig) -> dict[str, dict[str, Any]]:
    """Per-module widths and tensor shapes that differ from a fresh build of ``cfg`` without overrides."""
    with torch.device("meta"):
        reference = StudentStereo(cfg.replace(layer_shapes={}))
    ref_modules = dict(reference.named_modules())
    shapes: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        ref = ref_modules.get(name)
        if ref is None:
            continue
        own = {k: list(v.shape) for k, v in list(module.named_parameters(recurse=False))
               + list(module.named_buffers(recurse=False)) if v is not None}
        ref_own = {k: list(v.shape) for k, v in list(ref.named_parameters(recurse=False))
                   + list(ref.named_buffers(recurse=False)) if v is not None}
        attrs = {a: _plain(getattr(module, a)) for a in _WIDTH_ATTRS if hasattr(module, a)}
        ref_attrs = {a: _plain(getattr(ref, a)) for a in _WIDTH_ATTRS if hasattr(ref, a)}
        if own != ref_own or attrs != ref_attrs:
            shapes[name] = {"tensors": own, "attrs": attrs}
    return shapes


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def apply_layer_shapes(model: nn.Module, shapes: dict[str, dict[str, Any]]) -> None:
    """Resize modules in place to recorded widths (values are placeholders until a state dict loads)."""
    modules = dict(model.named_modules())
    for name, spec in shapes.items():
        if name not in modules:
            raise CheckpointError(f"recorded layer {name!r} does not exist in this student architecture")
        module = modules[name]
        for attr, value in spec.get("attrs", {}).items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
        for tname, shape in spec.get("tensors", {}).items():
            if tname in module._parameters and module._parameters[tname] is not None:
                old = module._parameters[tname]
                module._parameters[tname] = nn.Parameter(
                    torch.zeros(shape, dtype=old.dtype, device=old.device), requires_grad=old.requires_grad
                )
            elif tname in module._buffers and module._buffers[tname] is not None:
                old = module._buffers[tname]
                module._buffers[tname] = torch.zeros(shape, dtype=old.dtype, device=old.device)


def save_student(model: StudentStereo, path: str | Path) -> Path:
    """Write ``config.yaml`` (with per-layer widths) and ``model.safetensors`` into the directory ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg.replace(layer_shapes=record_layer_shapes(model, model.cfg))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp)))
    cfg.to_yaml(path / CONFIG_NAME)
    return path


def load_student(path: str | Path, device: str | torch.device = "cpu") -> StudentStereo:
    """Rebuild a saved student exactly (also after pruning) and load its weights strictly."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.is_file() or not weights.is_file():
        raise CheckpointError(
            f"{path} is not a saved student: expected {CONFIG_NAME} and {WEIGHTS_NAME} in that directory"
        )
    cfg = StudentConfig.from_yaml(cfg_file)
    model = build_student(cfg)
    state = load_file(str(weights))
    from teacher.loading import check_state_dict

    check_state_dict(model, state, str(weights))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
