"""Weights from elsewhere into a student: tensor slicing by leading channels, and timm EdgeNeXt backbones.

Two callers share one slicing rule: a student inherits from a wider parent of its search space
(``compress.nas.inherit``), and a student's EdgeNeXt backbone starts from an ImageNet-trained timm EdgeNeXt
(``StudentConfig.backbone_weights``). The rule: a narrower tensor takes the source's leading entries along
every dimension. Depth follows EdgeNeXt's layout, where a stage's last block is its attention (SDTA) block and
the ones before it are convolution blocks: a shallower stage takes the source's first blocks and its last
block (:func:`block_sources`). Where the source is already ordered by importance, the leading channels are
the important ones.
"""

from __future__ import annotations

import re
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from compress.errors import CheckpointError, ConfigError

BACKBONE_PREFIX = "feature."
"""Where a student keeps its timm backbone's ``stem`` and ``stages`` (``feature.stem.0.weight``, ...)."""


def slice_leading(src: torch.Tensor, shape: torch.Size | tuple[int, ...], key: str = "") -> torch.Tensor | None:
    """``src``'s leading block of ``shape`` (None when ``src`` is smaller in some dimension or of another rank).

    A conv kernel's spatial dimensions (odd sizes) keep their centre, so a 3x3x3 kernel cut from a 7x7x7 one
    looks at the same neighbours.

    A fused query/key/value projection (a ``qkv`` key) is sliced in its three parts, so each keeps its leading
    channels rather than the first third taking the queries' rows.
    """
    if src.dim() != len(shape) or any(s < d for s, d in zip(src.shape, shape, strict=True)):
        return None
    parts = key.rsplit(".", 2)
    if len(parts) == 3 and parts[1] == "qkv" and src.shape[0] % 3 == 0 and shape[0] % 3 == 0:
        thirds = src.reshape(3, src.shape[0] // 3, *src.shape[1:])
        head = thirds[(slice(None), slice(0, shape[0] // 3), *(slice(0, d) for d in shape[1:]))]
        return head.reshape(tuple(shape)).clone()
    sizes = enumerate(zip(src.shape, shape, strict=True))
    return src[tuple(_window(i, have, want, src.dim()) for i, (have, want) in sizes)].clone()


def _window(dim: int, have: int, want: int, rank: int) -> slice:
    """The part of one dimension a smaller tensor takes: a conv kernel's centre, else the leading channels."""
    if rank in (4, 5) and dim >= 2 and have % 2 == 1 and want % 2 == 1:  # odd kernels: a 3 inside a 7 is its middle
        start = (have - want) // 2
        return slice(start, start + want)
    return slice(0, want)


_BLOCK = re.compile(r"^(.*stages\.(\d+)\.blocks\.)(\d+)(\..*)$")


def _depths(keys) -> dict[tuple[str, int], int]:
    depths: dict[tuple[str, int], int] = {}
    for key in keys:
        m = _BLOCK.match(key)
        if m:
            stage = (m.group(1), int(m.group(2)))
            depths[stage] = max(depths.get(stage, 0), int(m.group(3)) + 1)
    return depths


def block_sources(keys, source_keys, prefix: str = "") -> dict[str, str]:
    """For each of ``keys``, the key of ``source_keys`` it takes its tensor from.

    ``prefix`` is what ``keys`` carry before the source's names. Blocks of a shallower stage map onto the
    source's first blocks, and a stage's last block onto the source's last block (EdgeNeXt ends every stage
    with its attention block); every other key maps onto itself.
    """
    own, src = _depths(keys), _depths(prefix + k for k in source_keys)
    out = {}
    for key in keys:
        m = _BLOCK.match(key)
        name = key
        if m:
            stage, j = (m.group(1), int(m.group(2))), int(m.group(3))
            if stage in src and j == own[stage] - 1:
                name = f"{m.group(1)}{src[stage] - 1}{m.group(4)}"
        out[key] = name.removeprefix(prefix)
    return out


TIMM_PREFIX = "timm:"
"""``backbone_weights: timm:<model>`` fetches timm's pretrained weights of <model> (online users only)."""


def fetch_timm_state_dict(name: str) -> dict[str, torch.Tensor]:
    """timm's pretrained weights of model ``name`` (e.g. 'edgenext_small.usi_in1k'), downloaded by timm into its
    cache on first use: the one path in ffsc that reaches the internet, and only when a config asks for it."""
    if not timm.is_model(name):
        family = ", ".join(timm.list_models("edgenext*", pretrained=True))
        raise ConfigError(f"backbone_weights: {TIMM_PREFIX}{name}: timm has no such model (pretrained EdgeNeXt "
                          f"ones: {family})")
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as exc:  # noqa: BLE001 - offline, proxy, hub errors: one line, with the way out
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"backbone_weights: could not fetch timm's pretrained {name!r} ({type(exc).__name__}: {reason[:200]}); "
            f"without internet access, save timm.create_model({name!r}, pretrained=True).state_dict() with "
            "torch.save on a machine that has it and name that local file") from None
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def read_timm_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A timm state dict from a local ``.pth``/``.pt``/``.bin`` (torch) or ``.safetensors`` file, or from timm's
    hub for ``timm:<model>``."""
    if str(path).startswith(TIMM_PREFIX):
        return fetch_timm_state_dict(str(path)[len(TIMM_PREFIX):])
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"backbone_weights: {path} does not exist (expected a local timm EdgeNeXt state dict file)")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise CheckpointError(f"backbone_weights: cannot read {path}: {type(exc).__name__}: {exc}") from None
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"backbone_weights: {path} holds no state dict of tensors")
    return state


def load_backbone_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Copy a timm EdgeNeXt state dict into ``model``'s backbone; returns the keys that were sliced.

    timm's ``stem.*``/``stages.*`` keys map onto the student's ``feature.stem.*``/``feature.stages.*``; the
    classifier head is ignored. A narrower or shallower student takes the leading channels and first blocks;
    a student wider than the file, or a backbone layer the file lacks, is an error naming the layer.
    """
    state = read_timm_state_dict(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    heads = (BACKBONE_PREFIX + "stem.", BACKBONE_PREFIX + "stages.")
    own = {k: v for k, v in model.state_dict().items() if k.startswith(heads)}
    if not own:
        raise ConfigError(f"backbone_weights: {type(model).__name__} has no timm stem/stages under {BACKBONE_PREFIX!r}")
    new, sliced = {}, []
    sources = block_sources(own, state, BACKBONE_PREFIX)
    for key, target in own.items():
        src = state.get(sources[key])
        if src is None:
            raise ConfigError(f"backbone_weights: {path} has no tensor for backbone layer "
                              f"{sources[key]!r} (expected a timm EdgeNeXt state dict at least "
                              "as deep as the student's backbone_depths)")
        if src.shape == target.shape:
            new[key] = src.to(target.dtype)
            continue
        part = slice_leading(src, target.shape, key)
        if part is None:
            raise ConfigError(f"backbone_weights: layer {sources[key]!r} is {list(src.shape)} in "
                              f"{path} but {list(target.shape)} in the student (expected the file's backbone at "
                              "least as wide as backbone_dims)")
        new[key] = part.to(target.dtype)
        sliced.append(key)
    model.load_state_dict(new, strict=False)
    return sliced
