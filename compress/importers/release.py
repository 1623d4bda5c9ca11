"""Reading a released Fast-FoundationStereo checkpoint: the pickled module (through :mod:`.safe_unpickle`, so
nothing from it runs) becomes a tree of inert records, merged with the release's ``cfg.yaml``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from compress.errors import CheckpointError

from .safe_unpickle import Record, safe_load

# Module prefixes a release may name: its own code (under both names it registers), torch, timm, omegaconf.
ALLOWED_PREFIXES = ("core", "foundation_stereo_ori", "torch", "timm", "omegaconf", "typing", "collections",
                    "builtins", "numpy", "enum")
_OFFICIAL = ("core.", "foundation_stereo_ori.")
CFG_NAME = "cfg.yaml"
# Official module prefix -> ffsc module prefix.
_RENAMES = (("cnet.conv04.0", "cnet.net.0"), ("cnet.conv04.1", "cnet.inp.0"),
            ("spx_2_gru", "upsampler.spx_2_gru"), ("spx_gru", "upsampler.spx_gru"))


def rename(path: str) -> str:
    """The ffsc name of an official module or tensor path."""
    for old, new in _RENAMES:
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    return path


@dataclass
class Node:
    """One module of the unpickled tree: its official path, class path, attributes, tensors and children."""

    path: str
    cls: str
    attrs: dict[str, Any]
    params: dict[str, torch.Tensor | None] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor | None] = field(default_factory=dict)
    children: dict[str, Node] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Class name without its module."""
        return self.cls.rsplit(".", 1)[-1]

    @property
    def official(self) -> bool:
        """Whether the class comes from the Fast-FoundationStereo code."""
        return self.cls.startswith(_OFFICIAL)

    def walk(self):
        """This node and every node below it."""
        yield self
        for child in self.children.values():
            yield from child.walk()

    def get(self, path: str) -> Node | None:
        """The node at a relative dotted path, or None."""
        node = self
        for part in path.split(".") if path else []:
            node = node.children.get(part)
            if node is None:
                return None
        return node

    def tensors(self, prefix: str = ""):
        """(name, tensor) of every parameter and buffer below, as ``state_dict`` names them."""
        for k, v in {**self.params, **self.buffers}.items():
            if v is not None and k not in self.attrs.get("_non_persistent_buffers_set", set()):
                yield prefix + k, v
        for k, child in self.children.items():
            yield from child.tensors(f"{prefix}{k}.")


def _tree(obj: Any, path: str, source: str) -> Node:
    if not isinstance(obj, Record):
        raise CheckpointError(f"{source}: layer {path or '<root>'} is a {type(obj).__name__}, not a module")
    attrs = obj.attrs()
    node = Node(path, obj.path, attrs, dict(attrs.get("_parameters", {})), dict(attrs.get("_buffers", {})))
    for k, child in attrs.get("_modules", {}).items():
        if child is not None:
            node.children[k] = _tree(child, f"{path}.{k}" if path else k, source)
    return node


def plain(obj: Any) -> Any:
    """OmegaConf records (DictConfig/ListConfig/nodes) and containers as plain Python data."""
    if isinstance(obj, Record):
        attrs = obj.attrs()
        if "_content" in attrs:
            return plain(attrs["_content"])
        if "_val" in attrs:
            return plain(attrs["_val"])
        return None
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


# --- reading and classifying the file -------------------------------------------------------------------------
def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_release(ckpt: str | Path) -> tuple[Node, dict[str, Any], set[str]]:
    """The module tree of a released checkpoint, its config (pickled args over cfg.yaml) and the class paths."""
    ckpt = Path(ckpt)
    obj, classes = safe_load(ckpt, ALLOWED_PREFIXES)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and _is_state_dict(obj["model"]):
        keys = obj["model"]
        # The teacher's own layers: the DepthAnything ViT and the 1/4 stem its context network uses.
        if any(k.startswith(("feature.dino.", "stem_4.")) or ".feature.dino." in k for k in keys):
            raise CheckpointError(
                f"{ckpt} is a FoundationStereo teacher checkpoint (its state dict has the DepthAnything ViT "
                "feature.dino.*), not a Fast-FoundationStereo student; use it as --teacher or with "
                "'ffsc teacher inspect'"
            )
        obj = keys
    cfg_file = ckpt.parent / CFG_NAME
    if _is_state_dict(obj):
        beside = "" if cfg_file.is_file() else f" and there is no {CFG_NAME} beside it"
        raise CheckpointError(
            f"{ckpt} holds a plain state dict ({len(obj)} tensors){beside}; a released Fast-FoundationStereo "
            "checkpoint is the whole pickled module (model_best_bp2_serialize.pth), whose layer widths a state "
            "dict alone does not give"
        )
    if isinstance(obj, Record) and obj.name == "FoundationStereo":
        raise CheckpointError(
            f"{ckpt} is a pickled FoundationStereo teacher ({obj.path}), not a Fast-FoundationStereo student"
        )
    if not isinstance(obj, Record) or obj.name not in ("FastFoundationStereo", "FoundationStereoLite") or not (
        obj.path.startswith(_OFFICIAL)
    ):
        what = obj.path if isinstance(obj, Record) else type(obj).__name__
        raise CheckpointError(
            f"{ckpt} holds {what}; expected a pickled core.foundation_stereo.FastFoundationStereo module"
        )
    if not cfg_file.is_file():
        raise CheckpointError(f"{ckpt}: no {CFG_NAME} beside it; a release ships model_best_bp2_serialize.pth "
                              f"with its {CFG_NAME} in the same folder")
    try:
        cfg = yaml.safe_load(cfg_file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{cfg_file} is not valid YAML: {exc}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_file} should be a mapping of settings")
    root = _tree(obj, "", str(ckpt))
    args = plain(root.attrs.get("args")) or {}
    if not isinstance(args, dict):
        args = {}
    merged = {**cfg, **args}  # the pickled args built (and ran) the module; cfg.yaml fills the gaps
    return root, merged, classes

