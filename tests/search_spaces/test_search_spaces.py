"""Student configs, search spaces, presets, save/load (pruned widths included) and cost counting."""

from __future__ import annotations

import json

import optuna
import pytest
import torch

from compress.errors import ConfigError
from search_spaces import (
    PRESETS,
    StudentConfig,
    build_student,
    count_macs,
    load_space,
    load_student,
    preset,
    save_student,
)
from teacher import FoundationStereo, StereoOutput, TeacherConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _pair(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    left = 255 * torch.rand(1, 3, 64, 128, generator=g)
    return left, torch.roll(left, -3, dims=-1)


def _sample_configs(space_name: str, n: int, seed: int = 0):
    space = load_space(space_name)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [space.sample(study.ask()) for _ in range(n)]


def _check_roundtrip(cfg: StudentConfig, tmp_path) -> None:
    torch.manual_seed(0)
    model = build_student(cfg).eval()
    left, right = _pair()
    with torch.no_grad():
        disp = model(left, right, test_mode=True)
    assert disp.shape == (1, 1, 64, 128), cfg
    assert torch.isfinite(disp).all(), cfg
    save_student(model, tmp_path)
    loaded = load_student(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(left, right, test_mode=True), disp)


def test_tiny_space_property(tmp_path):
    for i, cfg in enumerate(_sample_configs("tiny", 50)):
        _check_roundtrip(cfg, tmp_path / str(i))


@pytest.mark.slow
def test_full_space_property(tmp_path):
    for i, cfg in enumerate(_sample_configs("fast_foundationstereo", 50, seed=1)):
        _check_roundtrip(cfg, tmp_path / str(i))


def test_full_space_samples_build_and_run(tmp_path):
    # A few full-space students in the fast suite; the slow test above covers 50.
    for i, cfg in enumerate(_sample_configs("fast_foundationstereo", 3, seed=7)):
        _check_roundtrip(cfg, tmp_path / str(i))


def test_space_sizes_and_enumerate():
    tiny = load_space("tiny")
    assert tiny.size() > 1000
    first = list(tiny.enumerate(limit=20))
    assert len({c.to_json() for c in first}) == 20
    full = load_space("fast_foundationstereo")
    assert full.size() > tiny.size()
    # The coupled dims are deduplicated: capping levels at a 1/8 volume must not double count.
    small = load_space("tiny")
    small.dimensions = [d for d in small.dimensions if d.name in ("volume_scale", "hourglass_levels")]
    assert small.size() == len(list(small.enumerate())) == 4


def test_space_validation_names_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nbase: tiny\ndimensions:\n  volume_dim:\n    choices: [12]\n")
    with pytest.raises(ConfigError, match="volume_dim choice 12 is not a multiple of 8"):
        load_space(bad)
    bad.write_text("name: bad\nbase: tiny\ndimensions:\n  cv_groups:\n    choices: [3]\n")
    with pytest.raises(ConfigError, match="cv_groups 3 does not divide feature_dim 32"):
        load_space(bad)
    bad.write_text("name: bad\nbase: tiny\ndimensions:\n  not_a_field:\n    choices: [1]\n")
    with pytest.raises(ConfigError, match="not_a_field"):
        load_space(bad)


@pytest.mark.parametrize(
    "field,value",
    [("cv_groups", 5), ("backbone", "resnet_does_not_exist"), ("iters", 0), ("volume_scale", 2),
     ("transformer_heads", 3), ("max_disp", 100), ("gru_levels", 4), ("classifier_kernel", 4)],
)
def test_invalid_config_names_field(field, value):
    with pytest.raises(ConfigError, match=f"StudentConfig.{field}"):
        preset("tiny", **{field: value})


def test_config_yaml_json_roundtrip(tmp_path):
    cfg = preset("small_eighth")
    cfg.to_yaml(tmp_path / "c.yaml")
    assert StudentConfig.from_yaml(tmp_path / "c.yaml") == cfg
    (tmp_path / "c.json").write_text(cfg.to_json())
    assert StudentConfig.from_yaml(tmp_path / "c.json") == cfg
    assert json.loads(cfg.to_json())["volume_scale"] == 8
    with pytest.raises(ConfigError, match="unknown field"):
        StudentConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_a_field_added_later_is_written_only_off_its_default():
    cfg = preset("tiny")
    assert "classifier_kernel" not in cfg.to_dict()  # earlier configs and the keys built from them are unchanged
    assert StudentConfig.from_dict(cfg.to_dict()).classifier_kernel == 7
    small = cfg.replace(classifier_kernel=3)
    assert small.to_dict()["classifier_kernel"] == 3
    assert StudentConfig.from_dict(small.to_dict()) == small
    assert build_student(small).classifier[2].weight.shape[2:] == (3, 3, 3)


def test_student_intermediates_match_teacher_contract():
    model = build_student(preset("tiny")).eval()
    left, right = _pair()
    with torch.no_grad():
        out = model(left, right, iters=3, return_intermediates=True)
        init, preds = model(left, right, iters=3)
    assert isinstance(out, StereoOutput)
    assert out.vit_feat is None and out.volume_scale == 4
    assert out.cost_logits.shape == (1, 16, 16, 32)
    assert len(out.disp_preds) == len(preds) == 3 and init.shape == (1, 1, 16, 32)
    assert len(out.hidden_states) == 3 and len(out.hidden_states[0]) == 1


def test_eighth_volume_student():
    model = build_student(preset("tiny", volume_scale=8, hourglass_levels=2, max_disp=64)).eval()
    with torch.no_grad():
        out = model(*_pair(), iters=2, return_intermediates=True)
    assert out.init_disp.shape == (1, 1, 8, 16) and out.cost_logits.shape[1] == 8
    assert out.disp.shape == (1, 1, 64, 128)


def test_pruned_widths_rebuild_exactly(tmp_path):
    """A student whose layer widths were changed (as pruning does) saves and reloads exactly."""
    model = build_student(preset("tiny")).eval()
    enc = model.update_block.encoder
    keep = torch.arange(0, 24)  # prune convc1 from 32 to 24 output channels, convc2 inputs to match
    c1, c2 = enc.convc1, enc.convc2
    c1.weight = torch.nn.Parameter(c1.weight.data[keep].clone())
    c1.bias = torch.nn.Parameter(c1.bias.data[keep].clone())
    c1.out_channels = 24
    c2.weight = torch.nn.Parameter(c2.weight.data[:, keep].clone())
    c2.in_channels = 24
    left, right = _pair()
    with torch.no_grad():
        expected = model(left, right, test_mode=True)
    save_student(model, tmp_path)
    saved = StudentConfig.from_yaml(tmp_path / "config.yaml")
    assert saved.layer_shapes["update_block.encoder.convc1"]["attrs"]["out_channels"] == 24
    assert saved.layer_shapes["update_block.encoder.convc2"]["tensors"]["weight"] == [32, 24, 3, 3]
    loaded = load_student(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(left, right, test_mode=True), expected)


def test_ffs_preset_matches_published_size():
    """Published: 14.6M parameters, ~310 GMACs; the released topology measures 334 GMACs at 480x640."""
    cost = count_macs(build_student(preset("fast_foundationstereo")), 480, 640, iters=8)
    assert abs(cost.params / 14.6e6 - 1) < 0.2
    assert abs(cost.gmacs / 310 - 1) < 0.2
    assert cost.correlation_macs == 224 * 48 * 120 * 160


def test_teacher_counts():
    with torch.device("meta"):
        teacher = FoundationStereo(TeacherConfig(vit_size="vitl", mixed_precision=False))
    cost = count_macs(teacher, 480, 640, iters=32)
    assert abs(cost.params / 374.5e6 - 1) < 0.05
    # Reference: 8157 GMACs for the official code at this size (32 iterations).
    assert abs(cost.gmacs / 8157 - 1) < 0.05


def test_presets_are_ordered_by_cost():
    costs = {n: count_macs(build_student(preset(n)), 64, 128).macs for n in PRESETS}
    assert costs["tiny"] < costs["small_eighth"] < costs["small"] < costs["fast_foundationstereo"]
    assert costs["fast_foundationstereo"] < costs["ffs_unpruned"]


def test_cli_space_show_and_sample(capsys):
    from compress.cli import main

    assert main(["space", "show", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "size:" in out and "volume_scale" in out
    assert main(["space", "sample", "tiny", "-n", "2", "--height", "64", "--width", "128", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and all(r["params"] > 0 and r["macs"] > 0 for r in rows)
