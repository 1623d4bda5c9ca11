"""Regenerate the Fast-FoundationStereo parity data in this folder with the official code.

Builds random-weight models with the official Fast-FoundationStereo code (NVlabs/Fast-FoundationStereo at
commit 68d2264f4aacf14fdb4b16837976fb88c9902a14), saves each the way the release does (a whole pickled
module ``model_best_bp2_serialize.pth`` beside a ``cfg.yaml``) and records the official forward on fixed
inputs in ``reference.npz``. Nothing here copies official code: it imports it from the path you give.

    git clone https://github.com/NVlabs/Fast-FoundationStereo /tmp/ffs-official
    git -C /tmp/ffs-official checkout 68d2264f4aacf14fdb4b16837976fb88c9902a14
    TORCHDYNAMO_DISABLE=1 python tests/data/ffs/make_reference.py --official /tmp/ffs-official

Cases (reduced widths so the files stay small; 64x128 inputs, fp32, CPU):

- ``code_topology``: the topology the official code builds (``FastFoundationStereo(args)``), with a
  narrow, shallow EdgeNeXt (widths 8/16/24/32, depths 1,1,1,1), hidden 16, volume_dim 8, max_disp 64,
  normalised correlation; every other width as the code builds it.
- ``released_like``: the same code with layers replaced by narrower instances of the official classes, as
  the released (pruned) checkpoints are (e.g. ``update_block.encoder.convc1`` 162->24 where the code builds
  162->256), and the group-wise correlation without normalisation (cfg ``normalize: false``).
- ``searched_variant``: pruned as ``released_like``, and cost-volume stages replaced by searched blocks built
  from the official ``ForwardHelper`` / ``PostForwardHelper`` (see ``searched_variant``); normalised correlation.

The official code asks timm for pretrained EdgeNeXt weights, which cannot be downloaded here: timm's
``create_model`` is wrapped to build EdgeNeXt with ``pretrained=False``. The official ``pytorch1`` volume
path runs on CPU without Triton; ``torch.compile`` is disabled (TORCHDYNAMO_DISABLE=1) so it runs eagerly.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402

PINNED_COMMIT = "68d2264f4aacf14fdb4b16837976fb88c9902a14"
HEIGHT, WIDTH, ITERS = 64, 128, 3


def base_cfg(normalize: bool) -> dict:
    """The cfg.yaml keys the official model reads (reduced widths)."""
    return {
        "vit_size": "vits", "hidden_dims": [16], "n_gru_layers": 1, "corr_levels": 2, "corr_radius": 4,
        "max_disp": 64, "cv_group": 8, "volume_dim": 8, "mixed_precision": False, "normalize": normalize,
        "valid_iters": ITERS, "low_memory": False,
    }


SMALL_DIMS = (8, 16, 24, 32)


def patch_backbone(depths: tuple[int, ...]) -> None:
    """Reduced widths: an untrained narrow EdgeNeXt, and the official decoder rebuilt for its widths.

    timm.create_model (asked for pretrained edgenext_small) builds an untrained EdgeNeXt with SMALL_DIMS.
    ``Feature`` hard-codes edgenext_small's widths, so the model is given a factory that builds the official
    ``Feature`` and then re-creates its decoder with the official classes at SMALL_DIMS, before
    ``FastFoundationStereo.__init__`` reads ``feature.d_out`` to size everything after it.
    """
    import core.foundation_stereo as ffs
    import timm
    from core.extractor import DepthAnythingFeature, Feature
    from core.submodule import Conv2x_IN
    from timm.models.edgenext import EdgeNeXt

    def create_model(name, pretrained=False, **kwargs):
        assert name == "edgenext_small", name
        return EdgeNeXt(dims=SMALL_DIMS, depths=depths, num_classes=0)

    def small_feature(args):
        feature = Feature(args)
        c = list(SMALL_DIMS)
        vit = DepthAnythingFeature.model_configs[args.vit_size]["features"] // 2
        feature.chans = c
        feature.deconv32_16 = Conv2x_IN(c[3], c[2], deconv=True, concat=True)
        feature.deconv16_8 = Conv2x_IN(c[2] * 2, c[1], deconv=True, concat=True)
        feature.deconv8_4 = Conv2x_IN(c[1] * 2, c[0], deconv=True, concat=True)
        feature.conv4 = nn.Conv2d(c[0] * 2, c[0] * 2 + vit, kernel_size=1, stride=1, padding=0)
        feature.d_out = [c[0] * 2 + vit, c[1] * 2, c[2] * 2, c[3]]
        return feature

    timm.create_model = create_model
    ffs.Feature = small_feature


def randomize(model: nn.Module, seed: int) -> None:
    """Deterministic random weights that exercise every path (norm statistics and layer scales too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = max(1, p[0].numel()) if p.dim() > 1 else 1
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            elif name.endswith("gamma"):
                p.copy_(0.2 + 0.3 * torch.rand(p.shape, generator=g))
            elif name.endswith("weight"):
                p.copy_(0.6 + 0.8 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
        # bfloat16-representable float32 values: the archive compresses to about half (see save_release).
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.copy_(t.to(torch.bfloat16).float())


def save_release(model: nn.Module, path: Path) -> None:
    """``torch.save(model)`` as the release does, the archive recompressed with deflate (torch.load reads it)."""
    import io
    import zipfile

    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            dst.writestr(item.filename, src.read(item), compress_type=zipfile.ZIP_DEFLATED)


def prune_like_release(model: nn.Module) -> None:
    """Replace layers by narrower ones built from the official classes, as the released checkpoints are."""
    from core.submodule import Conv3dNormActReduced, FeatureAtt
    from core.update import DispHead  # noqa: F401  (kept: the class the release uses there)

    enc = model.update_block.encoder
    cin = enc.convc1.in_channels
    hidden = model.args.hidden_dims[0]
    enc.convc1 = nn.Conv2d(cin, 24, 1, padding=0)
    enc.convc2 = nn.Conv2d(24, 40, 3, padding=1)
    enc.convd1 = nn.Conv2d(1, 16, 7, padding=3)
    enc.convd2 = nn.Conv2d(16, 8, 3, padding=1)
    enc.conv = nn.Conv2d(40 + 8, hidden - 1, 1, padding=0)
    mask = model.update_block.mask
    mask[0] = nn.Conv2d(hidden, 24, 3, padding=1)
    mask[2] = nn.Conv2d(24, 32, 3, padding=1)
    vd = model.volume_dim
    feat0 = model.feature.d_out[0]
    model.corr_feature_att = FeatureAtt(vd, feat0)
    model.corr_feature_att.feat_att[0].conv = nn.Conv2d(feat0, 40, 1, bias=False)
    model.corr_feature_att.feat_att[0].bn = nn.BatchNorm2d(40)
    model.corr_feature_att.feat_att[1] = nn.Conv2d(40, vd, 1)
    agg = model.cost_agg
    agg.conv_out[0] = Conv3dNormActReduced(vd, vd, hidden=4, kernel_size=3, kernel_disp=17)
    for layer in agg.atts["4"].sa:
        layer.linear1 = nn.Linear(vd, 12)
        layer.linear2 = nn.Linear(12, vd)
    model.cam.fc[0] = nn.Conv2d(hidden, 2, 1, bias=False)
    model.cam.fc[2] = nn.Conv2d(2, hidden, 1, bias=False)


def searched_variant(model: nn.Module) -> None:
    """Stages replaced by searched blocks (the official ForwardHelper / PostForwardHelper), as in the releases.

    Modelled on the published description of the c-fast-foundationstereo release: the corr_stem skipped, the
    corr_feature_att a chain of convs ending in feature attention, the hourglass's first two down steps folded
    into feature_att_8 / feature_att_16 chains, every up step a merge block (a transposed conv with
    output_padding, a 4x down / attention / trilinear 4x up path without ReLU), disparity kernels 17/13/9/3.
    """
    import core.foundation_stereo  # noqa: F401  (registers the foundation_stereo_ori aliases distill_block uses)
    from core.distill_block import ForwardHelper, PostForwardHelper
    from core.submodule import (
        BasicConv,
        Conv3dNormActReduced,
        CostVolumeDisparityAttention,
        FeatureAtt,
        ResnetBasicBlock3D,
    )

    c = model.volume_dim
    f = model.feature.d_out
    cin = model.proj_cmb.out_channels * 2 + model.cv_group

    def conv(i, o, **kw):
        kw = {"kernel_size": 3, "padding": 1, "stride": 1, **kw}
        return BasicConv(i, o, is_3d=True, bn=True, relu=kw.pop("relu", True), deconv=kw.pop("deconv", False), **kw)

    model.corr_stem = nn.Identity()
    model.corr_feature_att = ForwardHelper([conv(cin, c), conv(c, c), FeatureAtt(c, f[0])])
    model.classifier = ForwardHelper([nn.Conv3d(c, 1, kernel_size=3, padding=1)])
    agg = model.cost_agg
    agg.conv1 = nn.Identity()
    agg.conv2 = nn.Identity()
    agg.feature_att_8 = ForwardHelper([conv(c, c, stride=2), Conv3dNormActReduced(c, c * 2, kernel_disp=17),
                                       FeatureAtt(c * 2, f[1])])
    agg.feature_att_16 = ForwardHelper([conv(c * 2, c * 4, stride=2),
                                        Conv3dNormActReduced(c * 4, c * 2, kernel_disp=13),
                                        Conv3dNormActReduced(c * 2, c * 4, kernel_disp=3)])
    agg.post32_to_16 = PostForwardHelper([
        conv(c * 6, c * 4, deconv=True, stride=2, output_padding=1), "sum", FeatureAtt(c * 4, f[2]),
        conv(c * 4, c * 4), Conv3dNormActReduced(c * 4, c * 4, kernel_disp=9), conv(c * 4, c * 4)])
    agg.post16_to_8 = PostForwardHelper([
        conv(c * 4, c * 2, deconv=True, kernel_size=4, stride=2), "sum", conv(c * 2, c * 2),
        FeatureAtt(c * 2, f[1]), Conv3dNormActReduced(c * 2, c * 2, kernel_disp=9)])
    agg.post8_to_4 = PostForwardHelper([
        conv(c, c, kernel_size=4, padding=0, stride=4, relu=False),
        CostVolumeDisparityAttention(d_model=c, nhead=4, dim_feedforward=c * 4, num_transformer=1,
                                     max_len=model.args.max_disp // 16),
        nn.Upsample(scale_factor=4, mode="trilinear", align_corners=False), "sum", conv(c, c),
        ResnetBasicBlock3D(c, c, kernel_size=3, stride=1, padding=1)])
    for name in ("agg_0", "agg_1", "conv_out", "conv3_up", "conv2_up", "atts", "conv_patch"):
        delattr(agg, name)  # the merge blocks replace them


def build(official: Path, case: str) -> nn.Module:
    """A random-weight official model for one case."""
    from core.foundation_stereo import FastFoundationStereo
    from omegaconf import OmegaConf

    cfg = base_cfg(normalize=case != "released_like")
    patch_backbone((1, 2, 1, 1) if case == "released_like" else (1, 1, 1, 1))
    torch.manual_seed(0)
    model = FastFoundationStereo(OmegaConf.create(cfg))
    if case in ("released_like", "searched_variant"):
        prune_like_release(model)
    if case == "searched_variant":
        searched_variant(model)
    randomize(model, seed={"code_topology": 1, "released_like": 2, "searched_variant": 4}[case])
    return model.eval(), cfg


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed textured pair (right = left shifted by 5 px, plus noise), RGB 0..255."""
    g = torch.Generator().manual_seed(3)
    base = torch.rand(1, 3, HEIGHT // 8, WIDTH // 8 + 2, generator=g)
    base = torch.nn.functional.interpolate(base, size=(HEIGHT, WIDTH + 16), mode="bicubic", align_corners=False)
    left = base[..., 8 : 8 + WIDTH]
    right = base[..., 13 : 13 + WIDTH]
    noise = 0.02 * torch.randn(2, 1, 3, HEIGHT, WIDTH, generator=g)
    return ((left + noise[0]).clamp(0, 1) * 255).round(), ((right + noise[1]).clamp(0, 1) * 255).round()


def stub_demo_only_modules() -> None:
    """The official Utils.py imports imageio and cv2 for its demo helpers; the model needs neither."""
    import importlib.util
    import types

    for name in ("imageio", "cv2"):
        if importlib.util.find_spec(name) is None:
            sys.modules[name] = types.ModuleType(name)
    if not hasattr(sys.modules["cv2"], "COLORMAP_TURBO"):
        sys.modules["cv2"].COLORMAP_TURBO = 20  # a default argument value in Utils.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path, help="a checkout of the official repository")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    sys.path.insert(0, str(args.official.resolve()))
    stub_demo_only_modules()
    torch.set_grad_enabled(False)
    left, right = inputs()
    arrays = {"left": left.numpy(), "right": right.numpy(), "iters": np.array(ITERS)}
    for case in ("code_topology", "released_like", "searched_variant"):
        model, cfg = build(args.official, case)
        init_disp, preds = model(left, right, iters=ITERS, test_mode=False, optimize_build_volume="pytorch1")
        disp = model(left, right, iters=ITERS, test_mode=True, optimize_build_volume="pytorch1")
        assert torch.equal(disp, preds[-1]) and torch.isfinite(disp).all()
        arrays[f"{case}/init_disp"] = init_disp.numpy()
        arrays[f"{case}/disp"] = disp.numpy()
        folder = args.out / case
        folder.mkdir(parents=True, exist_ok=True)
        save_release(model, folder / "model_best_bp2_serialize.pth")
        (folder / "cfg.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        n = sum(p.numel() for p in model.parameters())
        print(f"{case}: {n / 1e6:.2f}M parameters, disparity range {disp.min():.2f}..{disp.max():.2f}")
    np.savez_compressed(args.out / "reference.npz", **arrays)
    (args.out / "COMMIT").write_text(PINNED_COMMIT + "\n")


if __name__ == "__main__":
    main()
