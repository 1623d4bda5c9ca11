"""Loading official FoundationStereo checkpoints (.pth, bare state dicts, safetensors) with clear errors."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from compress.errors import CheckpointError, ConfigError

from .config import TeacherConfig
from .dinov2 import VIT_SPECS
from .model import FoundationStereo

_POS_EMBED = "feature.dino.depth_anything.pretrained.pos_embed"
_SHOW = 5

# The last teacher checkpoint read and checked, kept until take_state_dict takes it: a run's preflight reads and
# checks the official checkpoint (1.3 GB for vitl) and the teacher stage loads it moments later, so the file is read
# once. One entry (a new teacher read replaces it, so at most one is held), keyed by the file's identity and
# modification time; students' files (no ViT) are never kept.
_last_teacher_read: tuple[tuple, dict[str, torch.Tensor]] | None = None


def _file_key(path: Path, trust_pickle: bool) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, trust_pickle)


def read_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: ``{"model": sd, ...}`` .pth, a bare state dict, or .safetensors."""
    global _last_teacher_read
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    key = _file_key(path, trust_pickle)
    tensors = _read_state_dict(path, trust_pickle)
    if _POS_EMBED in tensors:  # a FoundationStereo teacher: the one worth not reading twice
        _last_teacher_read = (key, tensors)
    return tensors


def take_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Like read_state_dict, but a teacher checkpoint read (and checked) moments ago, and unchanged since, is taken
    from memory instead of read again; the kept copy is released either way."""
    global _last_teacher_read
    path = Path(path)
    entry, _last_teacher_read = _last_teacher_read, None
    if entry is not None and path.is_file() and entry[0] == _file_key(path, trust_pickle):
        return entry[1]
    tensors = read_state_dict(path, trust_pickle=trust_pickle)
    _last_teacher_read = None  # the caller holds this one; keeping it too would double the memory
    return tensors


def _read_state_dict(path: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {exc}") from None
        check_finite_weights(tensors, path)
        return tensors
    with path.open("rb") as f:
        head = f.read(2)
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":
        raise CheckpointError(
            f"checkpoint {path} could not be read: it is neither a torch zip archive nor a pickle "
            "(expected a .pth written by torch.save, or a .safetensors file)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        reason = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise CheckpointError(
            f"checkpoint {path} holds Python objects beyond tensors, which safe loading refuses ({reason}). "
            "If you trust the file, load it with trust_pickle=True (CLI: --trust-checkpoint)."
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} could not be read as a torch file: {exc}") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"checkpoint {path} is not a state dict: expected a mapping of names to tensors, or "
            '{"model": state_dict, ...} as the official FoundationStereo checkpoints are'
        )
    # Checkpoints saved from DataParallel/DDP prefix every key with "module.".
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    check_finite_weights(obj, path)
    return obj


def check_finite_weights(state_dict: dict[str, torch.Tensor], source: str | Path) -> None:
    """Raise CheckpointError naming the first tensor holding NaN or Inf: bytes damaged in the middle of a file
    still unpickle, and would load "strictly" into a model that outputs NaN."""
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            count = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"checkpoint {source}: tensor {name!r} holds {count} NaN/Inf value(s) of "
                                  f"{tensor.numel()}; the file is damaged or was saved from a diverged run "
                                  "(expected finite weights)")


def guess_vit_size(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The ViT size a state dict's DINOv2 embedding width points to, or None if it has no ViT."""
    pos = state_dict.get(_POS_EMBED)
    if pos is None:
        return None
    for name, spec in VIT_SPECS.items():
        if pos.shape[-1] == spec.embed_dim:
            return name
    return None


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW]) + (", ..." if len(items) > _SHOW else "")
    return f"{len(items)} {title} ({shown})"


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise a CheckpointError naming missing, unexpected and mis-shaped keys (first few, with counts)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return
    parts = [f"checkpoint {source} does not match the model"]
    if missing:
        parts.append(_listing("missing keys", missing))
    if unexpected:
        parts.append(_listing("unexpected keys", unexpected))
    if shapes:
        parts.append(_listing("mis-shaped keys", shapes))
    cfg = getattr(model, "cfg", None)
    guess = guess_vit_size(state_dict)
    if guess is not None and cfg is not None and getattr(cfg, "vit_size", guess) != guess:
        parts.append(f"the checkpoint looks like vit_size={guess} but the config says {cfg.vit_size}")
    elif guess is not None:
        parts.append(f"the checkpoint looks like vit_size={guess}")
    else:
        parts.append("the checkpoint has no DepthAnything ViT, so it is not a FoundationStereo teacher")
    raise CheckpointError("; ".join(parts))


def load_teacher(
    checkpoint: str | Path,
    cfg: TeacherConfig | str | Path | None = None,
    device: str | torch.device = "cpu",
    trust_pickle: bool = False,
) -> FoundationStereo:
    """Build FoundationStereo from a checkpoint and its ``cfg.yaml`` (found beside it when not given)."""
    checkpoint = Path(checkpoint)
    if cfg is None:
        cfg_path = checkpoint.with_name("cfg.yaml")
        if not cfg_path.is_file():
            raise ConfigError(
                f"no cfg.yaml beside {checkpoint}; pass the config explicitly (CLI: --config) or put the "
                "official cfg.yaml next to the checkpoint"
            )
        cfg = TeacherConfig.from_yaml(cfg_path)
    elif not isinstance(cfg, TeacherConfig):
        cfg = TeacherConfig.from_yaml(cfg)
    state_dict = take_state_dict(checkpoint, trust_pickle=trust_pickle)  # preflight may have read it moments ago
    model = FoundationStereo(cfg)
    check_state_dict(model, state_dict, str(checkpoint))
    model.load_state_dict(state_dict, strict=True)
    return model.to(device).eval()


def teacher_summary(model: FoundationStereo) -> dict[str, Any]:
    """Parameter counts per top-level part, for ``ffsc teacher inspect``."""
    parts: dict[str, int] = {}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        if name.startswith("feature.dino."):
            top = "feature.dino (ViT, frozen)"
        elif name.startswith("feature."):
            top = "feature (EdgeNeXt + decoder)"
        parts[top] = parts.get(top, 0) + p.numel()
    return {"config": model.cfg.to_dict(), "parameters": sum(parts.values()), "parts": parts}
