"""Per-layer widths: what a module's tensors and width attributes are, and resizing a built model to recorded
ones before its (pruned) weights load. Independent of any architecture, so model builders and savers share it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.errors import CheckpointError

# Module attributes that carry a width; recorded when pruning changed them.
WIDTH_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
               "normalized_shape", "num_heads")


def tensor_shapes(module: nn.Module) -> dict[str, list[int]]:
    """Shapes of the module's own parameters and buffers (not its children's)."""
    tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
    return {k: list(v.shape) for k, v in tensors if v is not None}


def width_attrs(module: nn.Module) -> dict[str, Any]:
    """The module's width attributes, tuples as lists (as JSON and YAML record them)."""
    return {a: _plain(getattr(module, a)) for a in WIDTH_ATTRS if hasattr(module, a)}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def apply_layer_shapes(model: nn.Module, shapes: dict[str, dict[str, Any]]) -> None:
    """Resize modules in place to recorded widths (values are placeholders until a state dict loads)."""
    modules = dict(model.named_modules())
    for name, spec in shapes.items():
        if name not in modules:
            raise CheckpointError(f"recorded layer {name!r} does not exist in this {type(model).__name__} architecture")
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
