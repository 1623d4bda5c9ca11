"""Coupling rules of the FoundationStereo family and structured pruning of each part by half.

Each part of a tiny student (backbone, cost filtering, refinement) and the refinement of a tiny teacher are
pruned by 50%; the pruned model must run, export to ONNX with parity, save and reload to identical outputs,
cost fewer MACs, keep its fixed heads and keep equal correlation groups.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from compress.errors import ConfigError
from compress.export import to_onnx
from compress.prune import analyze, group_scores, plan_removals, prune_once
from search_spaces import build_student, count_macs, preset
from search_spaces.serialization import load_model, save_model
from teacher import FoundationStereo, TeacherConfig

ROUND_TO = 8


def _pair(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    left = 255 * torch.rand(1, 3, 64, 128, generator=g)
    return left, torch.roll(left, -3, dims=-1)


def _student():
    torch.manual_seed(0)
    return build_student(preset("tiny")).eval()


def _teacher():
    torch.manual_seed(0)
    cfg = TeacherConfig(vit_size="vitt", hidden_dims=[32, 32, 32], max_disp=64, mixed_precision=False)
    return FoundationStereo(cfg).eval()


def _part_macs(cost, prefixes) -> int:
    return sum(v for k, v in cost.macs_by_module.items()
               if k.count(".") == 1 and any(k.split(".", 1)[1] == p for p in prefixes))


def _fixed_widths(model) -> dict[str, int]:
    ub = model.update_block
    up = model.upsampler if hasattr(model, "upsampler") else model._upsampler[0]
    return {
        "disp_head_out": ub.disp_head.conv[-1].out_channels,
        "mask_out": ub.mask[2].out_channels,
        "upsampler_in": up.spx_2_gru.conv1.conv.in_channels,
        "upsampler_weights": up.spx_gru[0].out_channels,
        "convc1_in": ub.encoder.convc1.in_channels,
        "convd1_in": ub.encoder.convd1.in_channels,
        "classifier_out": model.classifier[-1].out_channels,
    }


@pytest.fixture(scope="module")
def student_coupling():
    model = _student()
    return model, analyze(model)


def test_recurrent_update_is_one_group_across_iterations(student_coupling):
    model, coupling = student_coupling
    hidden = coupling.group_of("update_block.gru04.small_gru.convz")
    gates = {f"update_block.gru04.{g}.{c}" for g in ("small_gru", "large_gru") for c in ("convz", "convr", "convq")}
    # Writers of the hidden state: both GRUs' gates and the context network's initial state.
    assert set(hidden.names("out")) == gates | {"cnet.net.0"}
    # Readers: conv1 (hx), convq (r*h), the disparity head and the mask head.
    assert {"update_block.gru04.conv1.0", "update_block.gru04.small_gru.convq", "update_block.gru04.large_gru.convq",
            "update_block.disp_head.conv.0", "update_block.mask.0"} <= set(hidden.names("in"))
    assert hidden.prunable and hidden.size == model.cfg.hidden_dim and hidden.part == "refinement"
    # The one-channel attention map and the geometry lookup are cut out of every group.
    assert not any("sam.samconv" in g.names("out") + g.names("in") for g in coupling.groups if g.prunable)
    assert not any("update_block.encoder.convc1" in g.names("in") for g in coupling.groups if g.prunable)


def test_concatenations_use_real_offsets(student_coupling):
    model, coupling = student_coupling
    # motion = cat([context (hidden_dim), encoder output (motion_dim - 1), disparity (no gradient)])
    enc = coupling.group_of("update_block.encoder.conv")
    conv0 = next(m for m in enc.members if m.name == "update_block.gru04.conv0.0")
    start = model.cfg.hidden_dim
    assert conv0.local == list(range(start, start + model.cfg.motion_dim - 1))


def test_fixed_heads_correlation_and_attention_rules(student_coupling):
    model, coupling = student_coupling
    for name in ("update_block.disp_head.conv.3", "update_block.mask.2", "upsampler.spx_gru.0", "classifier.2",
                 "cost_agg.conv_out.1.conv2.0"):
        group = coupling.group_of(name)
        assert not group.prunable and "family rule" in group.reason, name
    corr = coupling.group_of("feature.conv4")
    assert corr.unit == "correlation" and corr.num_groups == model.cfg.cv_groups and corr.prunable
    # Feature channels end at the correlation: they couple with its consumers' inputs, not the cost volume's.
    assert "correlation" in corr.names("in") and "corr_stem.0" not in corr.names("in")
    attn = coupling.group_of("cost_agg.atts.4.sa.0.self_attn.q_proj")
    assert attn.unit == "head" and attn.unit_size == model.cfg.volume_dim // model.cfg.transformer_heads
    assert set(attn.names("out")) == {f"cost_agg.atts.4.sa.0.self_attn.{p}_proj" for p in "qkv"}


def test_correlation_plan_removes_equally_from_every_group(student_coupling):
    model, coupling = student_coupling
    corr = coupling.group_of("feature.conv4")
    scores = group_scores(coupling, [corr], "random", seed=3)
    plan = plan_removals([corr], scores, 0.5, round_to=ROUND_TO)
    per_group = corr.size // corr.num_groups
    counts = Counter(i // per_group for i in plan[corr.id])
    assert set(counts) == set(range(corr.num_groups)) and len(set(counts.values())) == 1
    assert (corr.size - len(plan[corr.id])) % ROUND_TO == 0


def _macs_of(cost, name: str) -> int:
    return next(v for k, v in cost.macs_by_module.items() if k.split(".", 1)[-1] == name)


def _check_pruned(model, before, changed, prefixes):
    """Runs, widths are multiples of the round-to value, and the MACs fall where the widths fell."""
    left, right = _pair()
    with torch.no_grad():
        disp = model(left, right, iters=3, test_mode=True)
    assert disp.shape == (1, 1, 64, 128) and torch.isfinite(disp).all()
    assert changed and all(after < old for old, after in changed.values())
    # Channel counts are multiples of the round-to value; attention keeps whole heads instead.
    assert all(after % ROUND_TO == 0 for root, (_, after) in changed.items() if not root.endswith("_proj"))
    after = count_macs(model, 64, 128, iters=3)
    assert after.macs < before.macs and _part_macs(after, prefixes) < _part_macs(before, prefixes)
    for root, (old, new) in changed.items():  # a pruned layer's MACs shrink at least with its output width
        assert _macs_of(after, root) <= _macs_of(before, root) * new / old + 1, root
    return disp


STUDENT_PARTS = {
    "backbone": ("feature",),
    "cost_filtering": ("corr_stem", "corr_feature_att", "cost_agg", "classifier", "proj_cmb"),
    "refinement": ("cnet", "update_block", "upsampler", "stem_2", "cam"),
}


@pytest.fixture(scope="module")
def student_macs():
    return count_macs(_student(), 64, 128, iters=3)


@pytest.mark.parametrize("part", list(STUDENT_PARTS))
def test_prune_each_student_part_by_half(part, student_macs):
    model = _student()
    fixed = _fixed_widths(model)
    changed = prune_once(model, 0.5, [part], importance="magnitude", round_to=ROUND_TO)
    part_of = {"backbone": "feature.", "cost_filtering": ("corr_", "cost_agg.", "classifier.", "proj_cmb"),
               "refinement": ("cnet.", "update_block.", "upsampler.", "stem_2.", "cam.")}[part]
    assert all(root.startswith(part_of) for root in changed)
    _check_pruned(model, student_macs, changed, STUDENT_PARTS[part])
    assert _fixed_widths(model) == fixed
    groups = model.cfg.cv_groups
    assert model.correlation.in_channels == model.feature.conv4.out_channels
    assert model.correlation.in_channels % groups == 0 and model.correlation.in_channels % ROUND_TO == 0
    if part == "backbone":
        assert model.feature.conv4.out_channels == model.cfg.feature_dim // 2
    if part == "cost_filtering":  # whole heads went, each head keeps its width
        attn = model.cost_agg.atts["4"].sa[0].self_attn
        assert attn.num_heads == model.cfg.transformer_heads // 2
        assert attn.q_proj.out_features == attn.num_heads * model.cfg.volume_dim // model.cfg.transformer_heads


def test_student_pruned_everywhere_reloads_and_exports(student_macs, tmp_path):
    model = _student()
    changed = prune_once(model, 0.5, list(STUDENT_PARTS), importance="magnitude", round_to=ROUND_TO)
    disp = _check_pruned(model, student_macs, changed, sum(STUDENT_PARTS.values(), ()))
    save_model(model, tmp_path / "saved")
    reloaded = load_model(tmp_path / "saved")
    left, right = _pair()
    with torch.no_grad():
        assert torch.equal(reloaded(left, right, iters=3, test_mode=True), disp)
    report = to_onnx(reloaded, tmp_path / "pruned.onnx", 64, 128, iters=2)
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-2


def test_prune_teacher_refinement_by_half(tmp_path):
    model = _teacher()
    fixed = _fixed_widths(model)
    before = count_macs(model, 64, 128, iters=3)
    changed = prune_once(model, 0.5, ["refinement"], importance="magnitude", round_to=ROUND_TO)
    assert all(r.startswith(("update_block", "cnet.outputs", "spx_", "stem_2", "cam")) for r in changed)
    disp = _check_pruned(model, before, changed, ("update_block", "cnet", "spx_2_gru", "spx_gru"))
    assert _fixed_widths(model) == fixed
    save_model(model, tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["cfg.yaml", "layer_shapes.json",
                                                                     "model.safetensors"]
    reloaded = load_model(tmp_path / "saved")
    assert isinstance(reloaded, FoundationStereo)
    with torch.no_grad():
        assert torch.equal(reloaded(*_pair(), iters=3, test_mode=True), disp)


def test_teacher_scope_is_refinement_only():
    with pytest.raises(ConfigError, match="refinement"):
        prune_once(_teacher(), 0.5, ["backbone"])


@pytest.mark.slow
def test_pruned_teacher_exports_to_onnx_with_parity(tmp_path):
    model = _teacher()
    prune_once(model, 0.5, ["refinement"], importance="magnitude", round_to=ROUND_TO)
    report = to_onnx(model, tmp_path / "teacher.onnx", 64, 128, iters=2)
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-2
