"""Distillation losses: exact zeros, hand-computed re-binning, and real descent on a tiny student/teacher pair."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compress.data import SyntheticConfig, SyntheticStereoDataset
from compress.distill.config import CostVolumeLossConfig, FeatureLossConfig, LossConfig, OutputLossConfig
from compress.distill.losses import (
    DistillLoss,
    FeatureAdapters,
    GroundTruth,
    TeacherTargets,
    cost_volume_loss,
    feature_loss,
    output_loss,
    rebin_disparity,
    resample_distribution,
)
from teacher import FoundationStereo, StereoOutput, TeacherConfig
from tests.stereo_toy import make_toy


def _expected(prob: torch.Tensor, scale: int) -> torch.Tensor:
    """Expected disparity in image pixels of a B x D x h x w distribution counted in units of ``scale``."""
    levels = torch.arange(prob.shape[1], dtype=prob.dtype).view(1, -1, 1, 1)
    return (prob * levels).sum(dim=1) * scale


def _output(disp, init, preds, feats=(), logits=None, scale=4) -> StereoOutput:
    return StereoOutput(
        disp=disp, init_disp=init, disp_preds=list(preds), features_left=list(feats), features_right=list(feats),
        cost_logits=logits, volume_scale=scale,
    )


# ------------------------------------------------------------------------------------------- re-binning


def test_rebin_hand_computed_scale4_to_scale8() -> None:
    # Teacher levels 0..3 at 4 px each sit at 0, 0.5, 1, 1.5 student levels of 8 px.
    prob = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64).view(1, 4, 1, 1)
    out = rebin_disparity(prob, scale_from=4, scale_to=8, num_to=3)
    assert torch.allclose(out.view(-1), torch.tensor([0.2, 0.6, 0.2], dtype=torch.float64))
    assert _expected(prob, 4).item() == pytest.approx(8.0)
    assert _expected(out, 8).item() == pytest.approx(8.0)


def test_rebin_hand_computed_scale8_to_scale4() -> None:
    prob = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).view(1, 3, 1, 1)
    out = rebin_disparity(prob, scale_from=8, scale_to=4, num_to=6)
    assert torch.allclose(out.view(-1), torch.tensor([0.5, 0, 0.3, 0, 0.2, 0], dtype=torch.float64))


@pytest.mark.parametrize(("s_t", "d_t", "s_s", "d_s"), [(4, 15, 8, 8), (4, 16, 4, 24), (8, 8, 4, 16), (4, 13, 8, 7)])
def test_rebin_preserves_expected_disparity_and_mass(s_t: int, d_t: int, s_s: int, d_s: int) -> None:
    # Every case keeps the teacher range (d_t - 1) * s_t within the student range (d_s - 1) * s_s.
    gen = torch.Generator().manual_seed(0)
    prob = torch.softmax(3 * torch.randn(2, d_t, 3, 5, generator=gen, dtype=torch.float64), dim=1)
    out = rebin_disparity(prob, s_t, s_s, d_s)
    assert out.shape == (2, d_s, 3, 5)
    assert torch.allclose(out.sum(dim=1), torch.ones(2, 3, 5, dtype=torch.float64))
    assert torch.allclose(_expected(out, s_s), _expected(prob, s_t))


def test_rebin_piles_out_of_range_mass_on_last_level() -> None:
    prob = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64).view(1, 4, 1, 1)  # 12 px
    out = rebin_disparity(prob, 4, 4, 2)  # the student only reaches 4 px
    assert torch.allclose(out.view(-1), torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_resample_distribution_pools_pixels_by_area() -> None:
    gen = torch.Generator().manual_seed(1)
    prob = torch.softmax(torch.randn(1, 15, 8, 16, generator=gen, dtype=torch.float64), dim=1)  # up to 56 px
    out = resample_distribution(prob.float(), (4, 8), scale_from=4, scale_to=8, num_to=8)
    assert out.shape == (1, 8, 4, 8)
    assert torch.allclose(out.sum(dim=1), torch.ones(1, 4, 8), atol=1e-6)
    # Both steps are linear, so the expected disparity map is the area average of the teacher's.
    want = F.avg_pool2d(_expected(prob, 4)[:, None], 2)[:, 0]
    assert torch.allclose(_expected(out.double(), 8), want, atol=1e-5)
    up = resample_distribution(prob.float(), (16, 32), scale_from=4, scale_to=4, num_to=16)
    assert up.shape == (1, 16, 16, 32)
    assert torch.allclose(_expected(up.double(), 4)[:, ::2, ::2].mean(), _expected(prob, 4).mean(), atol=0.5)
    assert torch.allclose(up.sum(dim=1), torch.ones(1, 16, 32), atol=1e-6)


# ----------------------------------------------------------------------------------------------- zeros


def test_losses_are_zero_when_student_equals_teacher() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 8, 4, 8, generator=gen)
    init = 8 * torch.rand(2, 1, 4, 8, generator=gen)
    disp = F.interpolate(init, size=(16, 32), mode="bilinear", align_corners=False) * 4
    feats = [torch.randn(2, 6, 4, 8, generator=gen), torch.randn(2, 10, 2, 4, generator=gen)]
    student = _output(disp, init, [disp, disp], feats, logits)
    teacher = TeacherTargets.from_output(_output(disp, init, [disp], feats, logits))
    adapters = FeatureAdapters.discover(student, teacher.features)
    assert all(isinstance(m, torch.nn.Identity) for m in adapters.proj.values())
    assert feature_loss(student, teacher, adapters).item() == 0.0
    for t in (1.0, 2.5):
        cv = cost_volume_loss(student, teacher, CostVolumeLossConfig(temperature=t))
        assert abs(cv.item()) < 1e-5
    gt = GroundTruth(disp=disp.clone(), valid=torch.ones_like(disp, dtype=torch.bool), has_gt=torch.tensor([1, 1]))
    parts = output_loss(student, teacher, gt, OutputLossConfig())
    assert all(abs(v.item()) < 1e-5 for v in parts.values()), parts
    total, named = DistillLoss(LossConfig(), adapters)(student, teacher, gt)
    assert abs(total.item()) < 1e-4
    assert set(named) == {"feature", "cost_volume", "output_teacher", "output_gt", "init"}


def test_feature_adapters_match_by_resolution_and_project_the_student() -> None:
    image = torch.zeros(1, 1, 64, 128)
    student = _output(image, None, [image], feats=[torch.zeros(1, 8, 16, 32), torch.zeros(1, 16, 8, 16),
                                                   torch.zeros(1, 4, 32, 64)])
    teacher = {4: torch.zeros(1, 112, 16, 32), 8: torch.zeros(1, 16, 8, 16), 16: torch.zeros(1, 320, 4, 8)}
    adapters = FeatureAdapters.discover(student, teacher)
    assert adapters.pairs == [(4, 0, 8, 112), (8, 1, 16, 16)]  # stride 2 has no teacher level, 16 no student one
    assert isinstance(adapters.proj["4"], torch.nn.Conv2d) and adapters.proj["4"].out_channels == 112
    assert isinstance(adapters.proj["8"], torch.nn.Identity)
    projected = adapters(student.features_left)
    assert projected[4].shape == (1, 112, 16, 32)
    widths_only = FeatureAdapters.discover(student, {4: 112})
    assert widths_only.pairs == [(4, 0, 8, 112)]


def test_output_loss_weights_iterations_by_gamma_and_masks_ground_truth() -> None:
    target = torch.full((2, 1, 4, 8), 10.0)
    preds = [target + 3.0, target + 2.0, target + 0.5]  # smooth-L1 (beta 1): 2.5, 1.5, 0.125
    student = _output(target, None, preds)
    teacher = TeacherTargets(disp=target)
    cfg = OutputLossConfig(gamma=0.5, init_weight=0.0, gt_weight=0.0)
    parts = output_loss(student, teacher, None, cfg)
    assert parts["output_teacher"].item() == pytest.approx(0.25 * 2.5 + 0.5 * 1.5 + 0.125)
    # Ground truth: sample 1 has none, and half of sample 0 is invalid; only the valid half counts.
    gt_disp = torch.full((2, 1, 4, 8), 13.0)
    valid = torch.zeros(2, 1, 4, 8, dtype=torch.bool)
    valid[0, :, :, :4] = True
    gt_disp[0, :, :, 4:] = 1000.0
    gt_disp[1] = -1000.0
    gt = GroundTruth(disp=gt_disp, valid=valid, has_gt=torch.tensor([True, False]))
    parts = output_loss(_output(target, None, [target]), teacher, gt, OutputLossConfig(weight=0.0, init_weight=0.0))
    assert parts["output_gt"].item() == pytest.approx(2.5)
    # max_disp drops pixels whose target is at or beyond it.
    parts = output_loss(
        _output(target, None, [target]), teacher, gt, OutputLossConfig(weight=0.0, init_weight=0.0, max_disp=12.0)
    )
    assert parts["output_gt"].item() == 0.0


def test_init_term_upsamples_to_image_pixels() -> None:
    init = torch.full((1, 1, 4, 8), 2.0)  # volume pixels at scale 4 -> 8 image pixels
    disp = torch.full((1, 1, 16, 32), 8.0)
    parts = output_loss(_output(disp, init, [disp]), TeacherTargets(disp=disp), None, OutputLossConfig())
    assert parts["init"].item() == pytest.approx(0.0, abs=1e-6)
    parts = output_loss(_output(disp, init, [disp]), TeacherTargets(disp=disp + 2), None, OutputLossConfig())
    assert parts["init"].item() == pytest.approx(0.5 * 1.5)


def test_disabled_losses_are_absent() -> None:
    cfg = LossConfig(feature=FeatureLossConfig(enabled=False), cost_volume=CostVolumeLossConfig(enabled=False))
    disp = torch.ones(1, 1, 8, 8)
    total, named = DistillLoss(cfg)(_output(disp, None, [disp + 1]), TeacherTargets(disp=disp))
    assert set(named) == {"output_teacher", "output_gt", "init"}
    assert total.item() == pytest.approx(sum(v.item() for v in named.values()))


# ------------------------------------------------------------------------------------------------ descent


@pytest.fixture(scope="module")
def tiny_pair() -> tuple[dict, StereoOutput]:
    """One synthetic 32x64 sample and the tiny random teacher's intermediates on it."""
    ds = SyntheticStereoDataset(1, SyntheticConfig(height=32, width=64, max_disp=12, num_objects=2))
    item = ds[0]
    torch.manual_seed(0)
    teacher = FoundationStereo(
        TeacherConfig(vit_size="vitt", hidden_dims=[32, 32, 32], max_disp=64, mixed_precision=False)
    ).eval()
    with torch.no_grad():
        out = teacher(item["left"][None], item["right"][None], iters=2, test_mode=True, return_intermediates=True)
    return item, out


@pytest.mark.parametrize("name", ["feature", "cost_volume", "output_teacher", "output_gt", "init"])
def test_each_loss_is_positive_and_decreases(tiny_pair, name: str) -> None:
    item, t_out = tiny_pair
    teacher = TeacherTargets.from_output(t_out)
    assert teacher.prob.shape[1] == 16 and teacher.prob_scale == 4  # the toy student has 8 levels: re-binned
    gt = GroundTruth.from_batch({k: v[None] if hasattr(v, "ndim") else v for k, v in item.items()})
    student = make_toy(seed=3).train()
    left, right = item["left"][None], item["right"][None]
    with torch.no_grad():
        dry = student(left, right, iters=2, return_intermediates=True)
    adapters = FeatureAdapters.discover(dry, teacher.features)
    assert adapters.pairs == [(4, 0, 8, 112)]
    # The random teacher's disparities lie beyond the toy's 28 px volume range: the init term learns from GT.
    out_cfg = OutputLossConfig(gamma=0.8, weight=0.0 if name in ("output_gt", "init") else 1.0)

    def loss_of(out: StereoOutput) -> torch.Tensor:
        if name == "feature":
            return feature_loss(out, teacher, adapters)
        if name == "cost_volume":
            return cost_volume_loss(out, teacher, CostVolumeLossConfig(temperature=2.0))
        return output_loss(out, teacher, gt, out_cfg)[name]

    opt = torch.optim.Adam(list(student.parameters()) + list(adapters.parameters()), lr=1e-2)
    values = []
    for _ in range(8):
        loss = loss_of(student(left, right, iters=2, return_intermediates=True))
        values.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert values[0] > 0
    assert min(values[-2:]) < 0.95 * values[0], values


def test_normalised_feature_loss_ignores_feature_scale() -> None:
    gen = torch.Generator().manual_seed(4)
    s_feat = torch.randn(1, 8, 4, 8, generator=gen)
    t_feat = torch.randn(1, 8, 4, 8, generator=gen)
    disp = torch.zeros(1, 1, 16, 32)
    student = _output(disp, None, [disp], [s_feat])
    adapters = FeatureAdapters.discover(student, {4: t_feat})
    cfg = FeatureLossConfig(normalize=True)
    base = feature_loss(student, TeacherTargets(disp=disp, features={4: t_feat}), adapters, cfg)
    scaled = feature_loss(student, TeacherTargets(disp=disp, features={4: 50 * t_feat + 3}), adapters, cfg)
    assert base.item() > 0 and scaled.item() == pytest.approx(base.item(), rel=1e-4)
    raw = feature_loss(student, TeacherTargets(disp=disp, features={4: 50 * t_feat}), adapters)
    assert raw.item() > 100 * base.item()


@pytest.mark.parametrize("volume_scale", [4, 8])
def test_search_space_student_against_the_teacher(tiny_pair, volume_scale: int) -> None:
    from search_spaces import build_student, preset

    item, t_out = tiny_pair
    teacher = TeacherTargets.from_output(t_out)
    torch.manual_seed(0)
    student = build_student(preset("tiny", volume_scale=volume_scale, hourglass_levels=2)).train()
    out = student(item["left"][None], item["right"][None], iters=1, return_intermediates=True)
    assert out.volume_scale == volume_scale and out.cost_logits.shape[1] == 64 // volume_scale
    adapters = FeatureAdapters.discover(out, teacher.features)
    # Every student level finds the teacher level of its resolution; all widths differ, so all are projected.
    assert [p[0] for p in adapters.pairs] == [4, 8, 16, 32]
    assert all(isinstance(m, torch.nn.Conv2d) for m in adapters.proj.values())
    gt = GroundTruth.from_batch({k: v[None] if hasattr(v, "ndim") else v for k, v in item.items()})
    total, parts = DistillLoss(LossConfig(), adapters)(out, teacher, gt)
    assert torch.isfinite(total) and all(v.item() > 0 for v in parts.values()), parts
    total.backward()
    assert all(p.grad is not None for p in adapters.parameters())
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0
