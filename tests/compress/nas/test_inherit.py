"""Weight inheritance from a search space's parent student, and timm EdgeNeXt backbone weights from a local file."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import timm
import torch

from compress.errors import ConfigError
from compress.nas.inherit import inherit_student, order_by_importance, parent_config
from search_spaces import build_student, load_space, load_student, preset, save_student
from tests.paths import REPO

H, W = 64, 128


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, H, W, generator=g) * 255, torch.rand(1, 3, H, W, generator=g) * 255


@pytest.fixture(scope="module")
def space():
    return load_space("tiny")


@pytest.fixture(scope="module")
def parent(space):
    torch.manual_seed(0)
    model = build_student(parent_config(space)).eval()
    # Stand-in for training: non-default values everywhere, so a copy that dropped or shuffled any tensor shows.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def _narrow(space):
    cfg = parent_config(space)
    return cfg.replace(backbone_dims=[16, 24, 32, 48], backbone_depths=[1, 1, 1, 1], hidden_dim=16, volume_dim=8,
                       hourglass_widths=[16, 24], feature_dim=16, iters=2)


def test_parent_is_the_largest_member(space):
    cfg = parent_config(space)
    assert cfg.backbone_dims == [24, 32, 48, 64] and cfg.backbone_depths == [1, 1, 2, 1]
    assert (cfg.volume_scale, cfg.feature_dim, cfg.volume_dim, cfg.gru_levels, cfg.iters) == (4, 32, 16, 2, 4)
    for sample in space.enumerate(limit=40):
        assert all(a <= b for a, b in zip(sample.backbone_dims, cfg.backbone_dims, strict=True))
        assert sample.hidden_dim <= cfg.hidden_dim and sample.volume_dim <= cfg.volume_dim


def test_equal_widths_inherit_the_parent_exactly(parent):
    child, report = inherit_student(parent, parent.cfg)
    assert not report.sliced and not report.fresh
    a, b = _pair()
    with torch.no_grad():
        want = parent.eval()(a, b, test_mode=True)
        got = child.eval()(a, b, test_mode=True)
    assert torch.equal(want, got)


def test_narrower_layers_compute_the_parents_restricted_computation(space, parent):
    cfg = _narrow(space)
    child, report = inherit_student(parent, cfg)
    assert report.sliced and report.fraction_inherited() > 0.95, report.fresh
    # Depth: stage 2 keeps one of two blocks, the parent's last (EdgeNeXt's attention block ends each stage).
    keys = child.state_dict()
    assert not any(k.startswith("feature.stages.2.blocks.1.") for k in keys)
    assert torch.equal(keys["feature.stages.2.blocks.0.gamma_xca"],
                       parent.state_dict()["feature.stages.2.blocks.1.gamma_xca"][:32])
    assert torch.equal(keys["feature.stages.2.blocks.0.mlp.fc1.weight"],
                       parent.state_dict()["feature.stages.2.blocks.1.mlp.fc1.weight"][: 4 * 32, :32])
    # The fused query/key/value projection keeps the leading channels of each of its three parts.
    qkv_p = parent.state_dict()["feature.stages.1.blocks.0.xca.qkv.weight"].reshape(3, 32, 32)
    assert torch.equal(keys["feature.stages.1.blocks.0.xca.qkv.weight"], qkv_p[:, :24, :24].reshape(72, 24))
    x = torch.randn(1, 3, H, W)
    with torch.no_grad():
        # The stem conv keeps the parent's first 16 of 24 output channels.
        stem_p, stem_c = parent.feature.stem[0], child.feature.stem[0]
        assert torch.allclose(stem_c(x), stem_p(x)[:, :16], atol=1e-6)
        # The stage-1 downsampling conv reads 16 of 24 channels and writes 24 of 32: equal to the parent's conv
        # with the dropped input channels at zero, restricted to the kept outputs.
        conv_p, conv_c = parent.feature.stages[1].downsample[1], child.feature.stages[1].downsample[1]
        y = torch.randn(1, 16, H // 4, W // 4)
        padded = torch.cat([y, torch.zeros(1, 8, H // 4, W // 4)], dim=1)
        assert torch.allclose(conv_c(y), conv_p(padded)[:, :24], atol=1e-5)


def test_inherited_student_runs_exports_and_round_trips(space, parent, tmp_path):
    from compress.export import to_onnx

    child, _ = inherit_student(parent, _narrow(space))
    child.eval()
    a, b = _pair(1)
    with torch.no_grad():
        out = child(a, b, test_mode=True)
    assert out.shape == (1, 1, H, W) and torch.isfinite(out).all()
    folder = save_student(child, tmp_path / "child")
    again = load_student(folder)
    with torch.no_grad():
        assert torch.equal(again(a, b, test_mode=True), out)
    report = to_onnx(child, tmp_path / "child.onnx", H, W, child.cfg.iters, simplify=False)
    assert (tmp_path / "child.onnx").is_file() and report is not None


def test_importance_order_keeps_the_parents_function_and_puts_important_channels_first(space):
    from compress.prune.coupling import analyze
    from compress.prune.importance import group_scores

    torch.manual_seed(3)
    model = build_student(parent_config(space)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    a, b = _pair(2)
    with torch.no_grad():
        before = model(a, b, test_mode=True)
    counts = order_by_importance(model, H, W)
    assert counts["reordered"] > 20
    with torch.no_grad():
        after = model(a, b, test_mode=True)
    assert torch.allclose(after, before, atol=1e-3)
    coupling = analyze(model)
    groups = [g for g in coupling.groups if g.prunable and g.unit == "channel" and g.size > 1]
    scores = group_scores(coupling, groups, "magnitude")
    descending = [bool((s[:-1] >= s[1:] - 1e-5).all()) for s in scores.values()]
    # Every group that was reordered now reads most-important-first.
    assert sum(descending) >= counts["reordered"] + counts["in_order"]


# ------------------------------------------------------------------------------------ backbone weights


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory):
    torch.manual_seed(1)
    net = timm.create_model("edgenext_xx_small", pretrained=False)
    path = tmp_path_factory.mktemp("timm") / "edgenext_xx_small.pth"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


def test_backbone_weights_load_from_a_local_timm_file(timm_file, tmp_path):
    path, state = timm_file
    cfg = preset("tiny", backbone_dims=[24, 48, 88, 168], backbone_depths=[2, 2, 6, 2], backbone_heads=4,
                 backbone_weights=str(path))
    model = build_student(cfg)
    own = model.state_dict()
    for key in ("stem.0.weight", "stages.2.blocks.5.mlp.fc2.weight", "stages.3.blocks.1.xca.qkv.weight"):
        assert torch.equal(own["feature." + key], state[key])
    # Narrower and shallower: the leading channels and first blocks.
    small = build_student(preset("tiny", backbone_weights=str(path)))
    assert torch.equal(small.state_dict()["feature.stem.0.weight"], state["stem.0.weight"][:16])
    assert torch.equal(small.state_dict()["feature.stages.2.blocks.0.mlp.fc1.weight"],
                       state["stages.2.blocks.0.mlp.fc1.weight"][: 4 * 48, :48])
    assert torch.equal(small.state_dict()["feature.stages.2.blocks.1.xca.temperature"],
                       state["stages.2.blocks.5.xca.temperature"])
    # A saved student loads its own weights, even where the backbone file is gone.
    folder = save_student(small, tmp_path / "s")
    path.rename(path.with_suffix(".moved"))
    try:
        again = load_student(folder)
    finally:
        path.with_suffix(".moved").rename(path)
    assert torch.equal(again.state_dict()["feature.stem.0.weight"], state["stem.0.weight"][:16])


def test_backbone_weights_refuse_a_wider_student_and_a_missing_file(timm_file, tmp_path):
    path, _ = timm_file
    with pytest.raises(ConfigError, match=r"stem\.0\.weight.*at least as wide"):
        build_student(preset("tiny", backbone_dims=[32, 48, 88, 168], backbone_weights=str(path)))
    with pytest.raises(ConfigError, match="does not exist"):
        build_student(preset("tiny", backbone_weights=str(tmp_path / "nope.pth")))


# ------------------------------------------------------------------------------------ the search's proxy


def test_search_proxy_inherit_trains_the_parent_once_and_starts_trials_from_it(tmp_path):
    import dataclasses
    from types import SimpleNamespace

    import optuna

    from compress.nas.objective import StudentSearchObjective
    from compress.pipeline import load_run_recipe, prepare_labels
    from compress.pipeline.search import trial_settings

    synth = "synthetic: {height: 64, width: 128, max_disp: 24, num_objects: 2"
    recipe = load_run_recipe("recipes/quickstart_cpu.yaml", [
        f"run_dir={tmp_path}", "progress=false",
        f"data.train={{kind: synthetic, num_samples: 2, {synth}, seed: 0}}}}",
        f"data.eval={{kind: synthetic, num_samples: 1, {synth}, seed: 1000}}}}",
        "search.latency={mode: measured, backend: onnxruntime, warmup: 1, repeats: 1, threads: 1}",
        "search.proxy=inherit", "search.parent_steps=2", "search.distill_steps=1", "search.batch_size=1",
    ])
    torch.manual_seed(0)
    teacher = SimpleNamespace(model=build_student(preset("tiny")).eval(), identity={"name": "test-teacher"})
    labels_dir, eval_set = prepare_labels(recipe, tmp_path, teacher, torch.device("cpu"))
    settings = dataclasses.replace(trial_settings(recipe, tmp_path, labels_dir, eval_set, torch.device("cpu")),
                                   proxy=recipe.search.proxy, parent_steps=recipe.search.parent_steps)
    objective = StudentSearchObjective(load_space("tiny"), settings)
    study = optuna.create_study(directions=["minimize", "minimize"])
    trial = study.ask()
    metrics = objective(trial)
    assert metrics["epe"] >= 0 and trial.user_attrs["inherited_fraction"] > 0.5
    parent_file = tmp_path / "parent" / "student" / "model.safetensors"
    stamp = parent_file.stat().st_mtime_ns
    # A second objective on the same run directory (a resumed or parallel worker) reuses the parent.
    again = StudentSearchObjective(load_space("tiny"), settings)
    again(study.ask())
    assert parent_file.stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="search.proxy: got 'warm'"):
        load_run_recipe("recipes/quickstart_cpu.yaml", ["search.proxy=warm"])


def test_backbone_weights_from_timm_name_a_bad_model_and_explain_offline(tmp_path):
    with pytest.raises(ConfigError, match=r"timm:edgenext_bogus: timm has no such model .*edgenext_small\.usi_in1k"):
        build_student(preset("tiny", backbone_weights="timm:edgenext_bogus"))
    # Offline (as here and in CI), fetching fails with one line that says what to do instead; a fresh process so
    # that the hub library reads HF_HUB_OFFLINE at import.
    code = ("from search_spaces import build_student, preset\n"
            "build_student(preset('tiny', backbone_weights='timm:edgenext_x_small.in1k'))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("compress.errors.CheckpointError: backbone_weights: could not fetch timm's pretrained")
    assert "name that local file" in last
