"""Import a released Fast-FoundationStereo checkpoint (a whole pickled module + cfg.yaml) as an ffsc student.

The pickle is read by :mod:`compress.importers.safe_unpickle` (nothing from it runs): every module becomes an
inert record of its class path, hyper-parameters and tensors. The record tree is mapped onto a
:class:`~search_spaces.StudentConfig` (the official topology's dimensions, the correlation's normalisation,
per-layer widths for what pruning narrowed) and a state dict; every layer's class and non-width
hyper-parameters (kernels, strides, padding, groups, norms, activations) are checked against the student
built from that config, and anything the student family cannot express is reported by layer.

Reading the file is :mod:`.release`; this module maps the record tree onto the student family and checks it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.atomic import atomic_write_text
from compress.errors import CheckpointError, ConfigError
from search_spaces import StudentConfig, StudentStereo
from search_spaces.layer_shapes import WIDTH_ATTRS, apply_layer_shapes
from search_spaces.serialization import load_student, save_student
from teacher.loading import check_state_dict

from .release import Node, read_release, rename

REPORT_NAME = "import_report.json"

# Official class name -> the ffsc class that computes the same function from the same tensors.
_CLASS_MAP = {
    "FastFoundationStereo": "StudentStereo", "FoundationStereoLite": "StudentStereo",
    "Feature": "StereoFeature", "ContextNetSharedBackbone": "SharedContext",
    "BasicConv": "BasicConv", "BasicConv_IN": "BasicConvIN", "Conv2x_IN": "Conv2xIN", "Conv2x": "Conv2x",
    "Conv3dNormActReduced": "Conv3dNormActReduced", "ResnetBasicBlock": "ResnetBasicBlock",
    "ResnetBasicBlock3D": "ResnetBasicBlock", "FeatureAtt": "FeatureAtt", "hourglass": "Hourglass",
    "CostVolumeDisparityAttention": "CostVolumeDisparityAttention",
    "FlashAttentionTransformerEncoderLayer": "DisparityTransformerLayer",
    "FlashMultiheadAttention": "DisparityMultiheadAttention",
    "ChannelAttentionEnhancement": "ChannelAttentionEnhancement",
    "SpatialAttentionExtractor": "SpatialAttentionExtractor", "EdgeNextConvEncoder": "EdgeNextConvEncoder",
    "DispHead": "DispHead", "BasicMotionEncoder": "BasicMotionEncoder", "RaftConvGRU": "RaftConvGRU",
    "SelectiveConvGRU": "SelectiveConvGRU", "BasicSelectiveMultiUpdateBlock": "SelectiveMultiUpdateBlock",
    "ForwardHelper": "FeatureChain", "PostForwardHelper": "MergeBlock",
}
# Official parameterless modules that ffsc computes functionally (or that do nothing in eval mode).
_FUNCTIONAL = {"LeakyReLU", "Dropout", "Sigmoid", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "PositionalEmbedding",
               "Identity"}
_CONTAINERS = {"ModuleList", "Sequential", "ModuleDict"}
# Official layers outside the forward pass (built by the official __init__, never called).
_UNUSED = ("context_zqr_convs",)
_UNUSED_TENSORS = ("dx",)  # the lookup offsets, rebuilt from corr_radius
_CONV_HPARAMS = ("kernel_size", "stride", "padding", "dilation", "output_padding", "padding_mode")
_NORM_HPARAMS = ("eps", "affine", "track_running_stats")


# --- mapping onto a StudentConfig ------------------------------------------------------------------------------
def _need(root: Node, path: str, ckpt: str) -> Node:
    node = root.get(path)
    if node is None:
        raise CheckpointError(f"{ckpt}: layer {path} is missing; the student family needs it")
    return node


def _conv(root: Node, path: str, ckpt: str) -> dict[str, Any]:
    return _need(root, path, ckpt).attrs


def student_config(root: Node, args: dict[str, Any], ckpt: str, name: str = "imported"):
    """The StudentConfig whose student has the release's topology (widths that pruning changed come after)."""
    feature = _need(root, "feature", ckpt)
    stages = _need(feature, "stages", ckpt)
    stem = _need(feature, "stem.0", ckpt)
    dims, depths = [stem.attrs["out_channels"]], []
    for i in range(4):
        stage = _need(stages, str(i), ckpt)
        if i:
            dims.append(_need(stage, "downsample.1", ckpt).attrs["out_channels"])
        depths.append(len(_need(stage, "blocks", ckpt).children))
    heads = {n.attrs["num_heads"] for n in feature.walk() if n.name == "CrossCovarianceAttn"}
    if len(heads) > 1:
        raise CheckpointError(f"{ckpt}: layer feature.stages uses {sorted(heads)} attention heads in different "
                              "stages; the student family's EdgeNeXt has one head count for all stages")
    agg = _need(root, "cost_agg", ckpt)
    # Searched stages carry their own kernels (as volume blocks); the default APC kernel is the commonest.
    apc = Counter(n.children["conv2"].children["0"].attrs["kernel_size"][0]
                  for n in agg.walk() if n.name == "Conv3dNormActReduced")
    att = agg.get("atts.4")
    corr_stem = _need(root, "corr_stem", ckpt)
    vd = int(root.attrs.get("volume_dim", 28))

    def width(k: int) -> int:
        node = agg.get(f"conv{k}.0.conv")
        return node.attrs["out_channels"] if node is not None else vd * (2, 4, 6)[k - 1]
    enc = _need(root, "update_block.encoder", ckpt)
    levels = [k for k in ("gru04", "gru08", "gru16") if k in _need(root, "update_block", ckpt).children]
    head_blocks = sum(1 for n in _need(root, "update_block.disp_head", ckpt).walk() if n.name == "EdgeNextConvEncoder")
    try:
        cfg = StudentConfig(
            name=name,
            backbone="edgenext",
            backbone_dims=dims,
            backbone_depths=depths,
            backbone_heads=heads.pop() if heads else 8,
            feature_dim=_conv(root, "feature.conv4", ckpt)["out_channels"],
            volume_scale=4,
            max_disp=int(args.get("max_disp", 192)),
            cv_groups=int(root.attrs.get("cv_group", args.get("cv_group", 8))),
            concat_dim=2 * _conv(root, "proj_cmb", ckpt)["out_channels"],
            volume_dim=vd,
            stem_blocks=len(corr_stem.children) - 2 if corr_stem.name == "Sequential" else 2,
            hourglass_levels=3,
            hourglass_widths=[width(k) for k in (1, 2, 3)],
            apc_kernel=apc.most_common(1)[0][0] if apc else 17,
            agg_blocks=len(agg.children["agg_0"].children) - 1 if "agg_0" in agg.children else 2,
            transformer_layers=len(att.children["sa"].children) if att is not None else 0,
            transformer_heads=(att.get("sa.0.self_attn").attrs["num_heads"] if att is not None else 4),
            gru_levels=len(levels),
            hidden_dim=_conv(root, "update_block.gru04.small_gru.convz", ckpt)["out_channels"],
            motion_dim=_conv(root, "update_block.encoder.conv", ckpt)["out_channels"] + 1,
            motion_corr_dim=_conv(root, "update_block.encoder.convc1", ckpt)["out_channels"],
            motion_disp_dim=_conv(root, "update_block.encoder.convd1", ckpt)["out_channels"],
            head_blocks=head_blocks,
            corr_levels=int(args.get("corr_levels", 2)),
            corr_radius=int(args.get("corr_radius", 4)),
            iters=int(args.get("valid_iters", 8)),
            mixed_precision=bool(args.get("mixed_precision", True)),
            gwc_normalize=bool(args.get("normalize", True)),  # the official forward's default when unset
            attention_heads_as_sequence=True,  # what the official attention computes
            motion_conv_kernel=enc.children["conv"].attrs["kernel_size"][0],
        )
    except ConfigError as exc:  # names the field; say it came from this file
        raise CheckpointError(f"{ckpt}: the release's topology is outside the student family: {exc}") from None
    return cfg


# --- searched block variants -------------------------------------------------------------------------------
_SLOTS = ("corr_stem", "corr_feature_att", "classifier") + tuple(
    f"cost_agg.{n}" for n in ("conv1", "conv2", "conv3", "conv1_up", "conv2_up", "conv3_up", "agg_0", "agg_1",
                              "conv_out", "feature_att_8", "feature_att_16", "feature_att_32", "feature_att_up_8",
                              "feature_att_up_16"))
_MERGES = {"cost_agg.post32_to_16": ("cost_agg.conv3_up", "cost_agg.agg_0", "cost_agg.feature_att_up_16"),
           "cost_agg.post16_to_8": ("cost_agg.conv2_up", "cost_agg.agg_1", "cost_agg.feature_att_up_8"),
           "cost_agg.post8_to_4": ("cost_agg.conv_out", "cost_agg.atts", "cost_agg.conv_patch")}


def _unsupported(node: Node, ckpt: str, why: str) -> CheckpointError:
    return CheckpointError(f"{ckpt}: layer {node.path} ({node.cls}) {why}; the student family cannot express it")


def layer_spec(node: Node, ckpt: str) -> dict[str, Any]:
    """The volume-block layer spec (search_spaces.blocks) of one official layer."""
    a, kids = node.attrs, node.children
    if node.name == "BasicConv":
        conv, bn, relu = kids.get("conv"), kids.get("bn"), kids.get("relu")
        if conv is None or conv.name not in ("Conv3d", "ConvTranspose3d"):
            raise _unsupported(node, ckpt, "is not a 3D convolution")
        if bn is not None and bn.name not in ("BatchNorm3d", "Identity"):
            raise _unsupported(node, ckpt, f"normalises with {bn.name}")
        if relu is not None and relu.name == "LeakyReLU" and relu.attrs.get("negative_slope", 0.01) != 0.01:
            raise _unsupported(node, ckpt, "uses a LeakyReLU slope other than 0.01")
        c = conv.attrs
        if c.get("groups", 1) != 1 or conv.params.get("bias") is not None:
            raise _unsupported(node, ckpt, "has a grouped or biased convolution")
        spec = {"type": "conv3d", "in": c["in_channels"], "out": c["out_channels"],
                "deconv": conv.name == "ConvTranspose3d", "kernel_size": _hp(c["kernel_size"]),
                "stride": _hp(c["stride"]), "padding": _hp(c["padding"]), "dilation": _hp(c["dilation"]),
                "bn": bool(a.get("use_bn", True)) and bn is not None and bn.name == "BatchNorm3d",
                "relu": relu is not None and relu.name == "LeakyReLU"}
        if spec["deconv"]:
            spec["output_padding"] = _hp(c["output_padding"])
        return spec
    if node.name == "Conv3dNormActReduced":
        c1, c2 = node.get("conv1.0"), node.get("conv2.0")
        if c1 is None or c2 is None or _hp(c1.attrs["stride"]) != [1, 1, 1] or _hp(c2.attrs["stride"]) != [1, 1, 1]:
            raise _unsupported(node, ckpt, "is strided")
        return {"type": "apc", "in": c1.attrs["in_channels"], "hidden": c1.attrs["out_channels"],
                "out": c2.attrs["out_channels"], "kernel_size": c1.attrs["kernel_size"][1],
                "kernel_disp": c2.attrs["kernel_size"][0]}
    if node.name in ("ResnetBasicBlock3D", "ResnetBasicBlock"):
        c1 = node.get("conv1")
        if (c1 is None or c1.name != "Conv3d" or kids.get("downsample") is not None
                or c1.attrs["in_channels"] != c1.attrs["out_channels"] or _hp(c1.attrs["kernel_size"]) != [3, 3, 3]):
            raise _unsupported(node, ckpt, "is not a 3x3x3 residual block of one width")
        return {"type": "res3d", "channels": c1.attrs["out_channels"]}
    if node.name == "FeatureAtt":
        c0, c1 = node.get("feat_att.0.conv"), node.get("feat_att.1")
        return {"type": "feature_att", "cv": c1.attrs["out_channels"], "feat": c0.attrs["in_channels"],
                "hidden": c0.attrs["out_channels"]}
    if node.name == "CostVolumeDisparityAttention":
        layers = node.get("sa")
        first = layers.children["0"]
        pe = node.get("pos_embed0")
        if a.get("resize_embed"):
            raise _unsupported(node, ckpt, "resizes its positional table")
        return {"type": "disparity_attention", "d_model": first.get("linear1").attrs["in_features"],
                "heads": first.get("self_attn").attrs["num_heads"], "ff": first.get("linear1").attrs["out_features"],
                "layers": len(layers.children), "max_len": int(pe.attrs["pe"].shape[1]), "heads_as_sequence": True}
    if node.name == "Upsample":
        if a.get("size") is not None:
            raise _unsupported(node, ckpt, "upsamples to a fixed size")
        return {"type": "upsample", "scale_factor": _hp(a["scale_factor"]), "mode": a["mode"],
                "align_corners": a.get("align_corners")}
    if node.name == "Conv3d":
        return {"type": "raw_conv3d", "in": a["in_channels"], "out": a["out_channels"],
                "kernel_size": _hp(a["kernel_size"]), "stride": _hp(a["stride"]), "padding": _hp(a["padding"]),
                "groups": a["groups"], "bias": node.params.get("bias") is not None}
    if node.name == "BatchNorm3d":
        return {"type": "bn3d", "channels": a["num_features"]}
    if node.name == "Identity":
        return {"type": "identity"}
    raise _unsupported(node, ckpt, "is not a layer the searched volume blocks can hold")


def _layers(nodes, ckpt: str) -> list[dict[str, Any]]:
    return [layer_spec(n, ckpt) for n in nodes]


def _signature(node: Node) -> list[str]:
    return [_CLASS_MAP.get(c.name, c.name) for c in node.children.values()]


def volume_blocks(root: Node, default: nn.Module, ckpt: str) -> dict[str, dict[str, Any]]:
    """The searched variants of the release's cost-volume stages, as ``StudentConfig.volume_blocks``."""
    ours = dict(default.named_modules())
    blocks: dict[str, dict[str, Any]] = {}
    superseded: set[str] = set()
    for slot, replaced in _MERGES.items():
        node = root.get(slot)
        if node is None:
            continue
        if node.name != "PostForwardHelper":
            raise _unsupported(node, ckpt, "sits where a merge block (PostForwardHelper) belongs")
        blocks[slot] = {"kind": "merge", "op": node.attrs.get("op"),
                        "upsample": _layers(node.children["upsample"].children.values(), ckpt),
                        "out": _layers(node.children["out"].children.values(), ckpt)}
        superseded.update(replaced)
    for slot in _SLOTS + tuple(s for s in superseded if s not in _SLOTS):
        node, mine = root.get(slot), ours.get(slot)
        if node is None:
            if slot in superseded and mine is not None:
                blocks[slot] = {"kind": "absent"}
            elif mine is not None:
                raise CheckpointError(f"{ckpt}: layer {slot} is missing; the student family needs it")
            continue
        if mine is None:
            continue  # e.g. atts without a transformer in the default: checked by map_modules
        if node.name == "Identity":
            blocks[slot] = {"kind": "identity"}
        elif node.name == "ForwardHelper":
            blocks[slot] = {"kind": "chain", "keys": "layers",
                            "layers": _layers(node.children["layers"].children.values(), ckpt)}
        elif node.name == "Sequential" and _signature(node) != [type(m).__name__ for m in mine.children()]:
            blocks[slot] = {"kind": "chain", "keys": "index", "layers": _layers(node.children.values(), ckpt)}
        else:
            try:
                for n in node.walk():
                    sub = ours.get(n.path)
                    if sub is not None:
                        _check_layer(n, sub, ckpt)
            except CheckpointError:
                if node.name != "Sequential":
                    raise
                blocks[slot] = {"kind": "chain", "keys": "index", "layers": _layers(node.children.values(), ckpt)}
    return blocks


# --- layer-by-layer check and tensors ------------------------------------------------------------------------
def _hp(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def _check_layer(node: Node, ours: nn.Module, ckpt: str) -> None:
    our_name = type(ours).__name__
    where = f"{ckpt}: layer {node.path or '<root>'}"
    if node.official:
        expected = _CLASS_MAP.get(node.name)
        if expected is None:
            raise CheckpointError(f"{where} is a {node.cls}, a block the ffsc student family cannot express")
        if expected != our_name:
            raise CheckpointError(f"{where} is a {node.name} where the student family has a {our_name}")
    else:
        our_cls = f"{type(ours).__module__}.{type(ours).__qualname__}"
        # Our capture-safe subclasses of timm layers compute what their timm parents do.
        parents = {f"{c.__module__}.{c.__qualname__}" for c in type(ours).__mro__}
        if node.cls not in parents and node.name != our_name and not (
            node.name == "Sequential" and isinstance(ours, nn.Sequential)
        ):
            raise CheckpointError(f"{where} is a {node.cls} where the student family has a {our_cls}")
    # Widths (channels, groups, features) travel as per-layer widths; everything else must agree.
    for attr in _CONV_HPARAMS + _NORM_HPARAMS + ("approximate", "negative_slope"):
        if attr in node.attrs and hasattr(ours, attr):
            theirs, mine = _hp(node.attrs[attr]), _hp(getattr(ours, attr))
            if theirs != mine:
                raise CheckpointError(f"{where} has {attr}={theirs} where the student family has {mine}")
    for tname in ("bias",):
        if tname in node.params and hasattr(ours, tname):
            if (node.params[tname] is None) != (getattr(ours, tname) is None):
                has = "has" if node.params[tname] is not None else "has no"
                raise CheckpointError(f"{where} {has} a bias where the student family's layer does not agree")
    if node.name == "BasicConv":
        relu = node.children.get("relu")
        theirs = relu is not None and relu.name == "LeakyReLU"
        if relu is not None and theirs and relu.attrs.get("negative_slope", 0.01) != 0.01:
            raise CheckpointError(f"{where} uses LeakyReLU({relu.attrs['negative_slope']}); the family uses 0.01")
        if theirs != bool(ours.relu):
            raise CheckpointError(f"{where} has relu={theirs} where the student family has relu={bool(ours.relu)}")
    if node.name == "EdgeNextConvEncoder":
        norm = node.children.get("norm")
        if norm is not None and norm.name != "Identity":
            raise CheckpointError(f"{where} normalises with {norm.name}; the disparity head's blocks have no norm")
    if node.name == "ResnetBasicBlock3D" or node.name == "ResnetBasicBlock":
        if node.children.get("downsample") is not None or node.attrs.get("stride", 1) != 1:
            raise CheckpointError(f"{where} has a strided or projected shortcut; the family's block has neither")


def map_modules(root: Node, model: nn.Module, ckpt: str) -> list[str]:
    """Check every official layer against the student's; return the unused official layers left out."""
    ours = dict(model.named_modules())
    dropped = []
    for node in root.walk():
        if node.path.split(".")[0] in _UNUSED:
            if node.path in _UNUSED:
                dropped.append(node.path)
            continue
        mine = ours.get(rename(node.path))
        if mine is None:
            if node.name in _FUNCTIONAL and not list(node.tensors()):
                continue
            if node.name in _CONTAINERS and node.children:  # renamed containers: their children are checked
                continue
            parent = node.path.rsplit(".", 1)[0] if "." in node.path else "<root>"
            raise CheckpointError(
                f"{ckpt}: layer {node.path} ({node.cls}) has no counterpart in the student family "
                f"(inside {parent}); this release cannot be imported yet"
            )
        _check_layer(node, mine, ckpt)
    return dropped


def release_state(root: Node) -> dict[str, torch.Tensor]:
    """The release's tensors under ffsc names (unused layers and rebuilt buffers left out)."""
    state = {}
    for name, tensor in root.tensors():
        if name.split(".")[0] in _UNUSED or name in _UNUSED_TENSORS:
            continue
        state[rename(name)] = tensor.detach().clone().contiguous()
    return state


def layer_widths(model: nn.Module, root: Node, state: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Per-layer widths (tensor shapes and width attributes) where the release differs from the built student."""
    shapes: dict[str, dict[str, Any]] = {}
    nodes = {rename(n.path): n for n in root.walk()}
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        tensors = {k: list(state[f"{name}.{k}" if name else k].shape) for k, v in own.items()
                   if v is not None and (f"{name}.{k}" if name else k) in state}
        node = nodes.get(name)
        attrs = {}
        if node is not None:
            for a in WIDTH_ATTRS:
                if hasattr(module, a) and a in node.attrs:
                    attrs[a] = _hp(node.attrs[a])
        changed = any(list(v.shape) != tensors.get(k) for k, v in own.items() if v is not None and k in tensors)
        changed = changed or any(_hp(getattr(module, a)) != v for a, v in attrs.items())
        if changed:
            shapes[name] = {"tensors": tensors, "attrs": attrs}
    return shapes


# --- entry point ---------------------------------------------------------------------------------------------
def import_fast_foundationstereo(ckpt: str | Path, out_dir: str | Path, name: str | None = None):
    """Import a released checkpoint (``model_best_bp2_serialize.pth`` + ``cfg.yaml``) into a student directory.

    Returns the loaded :class:`~search_spaces.StudentStereo`; ``out_dir`` holds ``config.yaml``,
    ``model.safetensors`` and ``import_report.json``.
    """
    ckpt = Path(ckpt)
    root, args, classes = read_release(ckpt)
    cfg = student_config(root, args, str(ckpt), name or f"imported-{ckpt.parent.name}")
    with torch.device("meta"):
        default = StudentStereo(cfg)
    blocks = volume_blocks(root, default, str(ckpt))
    if blocks:
        cfg = cfg.replace(volume_blocks=blocks)
    model = StudentStereo(cfg)
    dropped = map_modules(root, model, str(ckpt))
    state = release_state(root)
    shapes = layer_widths(model, root, state)
    apply_layer_shapes(model, shapes)
    try:
        check_state_dict(model, state, str(ckpt))
        model.load_state_dict(state, strict=True)
    except CheckpointError:
        raise
    except RuntimeError as exc:
        raise CheckpointError(f"{ckpt}: the release's tensors do not fit the student family: {exc}") from None
    model.eval()
    out_dir = Path(out_dir)
    save_student(model, out_dir)
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    report = {
        "source": str(ckpt), "sha256": digest, "official_args": args, "classes": sorted(classes),
        "dropped_unused_layers": dropped, "pruned_layers": sorted(shapes),
        "searched_blocks": {k: v["kind"] for k, v in sorted(blocks.items())},
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    atomic_write_text(out_dir / REPORT_NAME, json.dumps(report, indent=1, sort_keys=True, default=str))
    return load_student(out_dir)
