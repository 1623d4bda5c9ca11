"""A search over the sub-networks of a trained parent: the space laid over it, trials sliced from its weights."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import optuna
import pytest
import torch

from compress.errors import ConfigError
from compress.importers import import_fast_foundationstereo
from compress.nas.inherit import inherit_student, order_by_importance
from compress.nas.objective import StudentSearchObjective
from compress.pipeline import load_run_recipe, prepare_labels, search_parent, search_space
from compress.pipeline.search import trial_settings
from compress.pipeline.standin import SHIPPED_DIR
from search_spaces import load_space, load_student, subnet_space
from search_spaces.space import _can_supply
from tests.compress.nas.test_inherit import H, W, _pair
from tests.paths import DATA


@pytest.fixture(scope="module")
def standin():
    """The shipped stand-in teacher (trained weights), its channels put in importance order."""
    model = load_student(SHIPPED_DIR)
    order_by_importance(model, H, W, seed=0)
    return model


def test_a_sub_network_with_the_parents_widths_computes_the_parents_function(standin):
    space = subnet_space(standin.cfg)
    a, b = _pair()
    for iters in (2, 4):
        cfg = space.config_from_values({"iters": iters})
        child, report = inherit_student(standin, cfg)
        assert not report.sliced and not report.fresh  # every tensor is the parent's own
        with torch.no_grad():
            assert torch.equal(child.eval()(a, b, test_mode=True), standin(a, b, iters=iters, test_mode=True))


def test_a_narrower_sub_network_keeps_every_untouched_layer_of_the_parent(standin):
    cfg = subnet_space(standin.cfg).config_from_values({"hidden_dim": 32, "transformer_layers": 0})
    child, report = inherit_student(standin, cfg)
    parent_state = standin.state_dict()
    assert report.sliced and not report.fresh
    for key in report.exact:
        assert torch.equal(child.state_dict()[key], parent_state[key]), key
    # The feature extractor and the cost volume are untouched by a narrower GRU: the parent's, exactly.
    assert any(k.startswith("feature.") for k in report.exact)
    x = torch.randn(1, 3, H, W)
    with torch.no_grad():
        got, want = child.eval().feature(x), standin.feature(x)
    flat_got, flat_want = ([t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
                           for out in (got, want))
    assert flat_got and len(flat_got) == len(flat_want)
    assert all(torch.equal(g, w) for g, w in zip(flat_got, flat_want, strict=True))
    sliced = [k for k in report.sliced if k.startswith("update_block.")]
    assert sliced and all(child.state_dict()[k].numel() < parent_state[k].numel() for k in sliced)


def test_a_smaller_classifier_kernel_takes_the_centre_of_the_parents(standin):
    cfg = standin.cfg.replace(classifier_kernel=3)
    child, report = inherit_student(standin, cfg)
    key = "classifier.2.weight"
    assert report.sliced == [key] and not report.fresh
    assert torch.equal(child.state_dict()[key], standin.state_dict()[key][:, :, 2:5, 2:5, 2:5])
    a, b = _pair()
    with torch.no_grad():
        assert torch.isfinite(child.eval()(a, b, iters=1, test_mode=True)).all()


def test_the_cpu_realtime_space_is_made_of_the_stand_ins_sub_networks(standin):
    space = load_space("cpu_realtime", parent=standin.cfg, parent_name="stand-in")
    for cfg in space.enumerate(limit=40):
        assert cfg.max_disp == 96 and cfg.iters <= 2 and cfg.classifier_kernel in (3, 7)
        _, report = inherit_student(standin, cfg)
        assert not report.fresh  # every weight comes from the parent
    with pytest.raises(ConfigError, match="classifier_kernel=7 needs classifier_kernel 7, small has 3"):
        load_space("cpu_realtime", parent=standin.cfg.replace(classifier_kernel=3), parent_name="small")


def test_the_subnet_space_holds_only_what_the_parent_can_supply(standin):
    space = subnet_space(standin.cfg)
    names = {d.name for d in space.dimensions}
    assert {"feature_dim", "hidden_dim", "iters", "max_disp", "volume_scale", "backbone_dims"} <= names
    assert space.config_from_values({}).to_dict() | {"name": ""} == (
        standin.cfg.replace(name="subnets-sample", layer_shapes={}).to_dict() | {"name": ""})
    for cfg in space.enumerate(limit=60):
        for field in ("feature_dim", "hidden_dim", "volume_dim", "backbone_dims", "iters", "max_disp"):
            assert _can_supply(getattr(standin.cfg, field), getattr(cfg, field), field), (field, cfg)
        assert cfg.volume_scale >= standin.cfg.volume_scale


def test_a_space_the_parent_cannot_supply_is_refused_by_name(standin):
    with pytest.raises(ConfigError, match=r"gru_levels=2 needs gru_levels 2, stand-in has 1"):
        load_space("tiny", parent=standin.cfg, parent_name="stand-in")
    with pytest.raises(ConfigError, match="sub-networks of a trained parent"):
        load_space("subnets")


def test_the_run_resolves_its_parent_before_any_work(tmp_path):
    recipe = load_run_recipe("recipes/quickstart_cpu.yaml", [f"run_dir={tmp_path}"])
    assert search_parent(recipe, SHIPPED_DIR) == SHIPPED_DIR  # 'auto' with a stand-in teacher
    assert search_space(recipe, SHIPPED_DIR).base_config.max_disp == 160
    largest = load_run_recipe("recipes/quickstart_cpu.yaml", ["search.parent=largest"])
    assert search_parent(largest, SHIPPED_DIR) is None
    official = load_run_recipe("recipes/quickstart_cpu.yaml", ["teacher.checkpoint=x.pth", "search.parent=teacher"])
    with pytest.raises(ConfigError, match="not of the student family"):
        search_parent(official, None)
    tiny = load_run_recipe("recipes/quickstart_cpu.yaml", ["search.space=tiny"])
    with pytest.raises(ConfigError, match="cannot supply"):
        search_space(tiny, SHIPPED_DIR)


def test_a_search_over_an_imported_fast_foundationstereo_release_runs_two_trials(tmp_path):
    parent_dir = tmp_path / "release"
    release = import_fast_foundationstereo(DATA / "ffs" / "released_like" / "model_best_bp2_serialize.pth",
                                           parent_dir)
    synth = "synthetic: {height: 64, width: 128, max_disp: 24, num_objects: 2"
    recipe = load_run_recipe("recipes/quickstart_cpu.yaml", [
        f"run_dir={tmp_path}", "progress=false", f"search.parent={parent_dir}", "search.space=subnets",
        f"data.train={{kind: synthetic, num_samples: 2, {synth}, seed: 0}}}}",
        f"data.eval={{kind: synthetic, num_samples: 1, {synth}, seed: 1000}}}}",
        "search.latency={mode: measured, backend: onnxruntime, warmup: 1, repeats: 1, threads: 1}",
        "search.distill_steps=1", "search.batch_size=1",
    ])
    teacher = SimpleNamespace(model=release, identity={"name": "the release itself"})
    labels_dir, eval_set = prepare_labels(recipe, tmp_path, teacher, torch.device("cpu"))
    parent = search_parent(recipe, None)
    assert parent == parent_dir
    space = search_space(recipe, parent)
    settings = dataclasses.replace(trial_settings(recipe, tmp_path, labels_dir, eval_set, torch.device("cpu"),
                                             parent=parent))
    objective = StudentSearchObjective(space, settings)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(2):
        trial = study.ask()
        metrics = objective(trial)
        study.tell(trial, [metrics["epe"], metrics["latency_ms"]])
        assert metrics["epe"] >= 0 and metrics["latency_ms"] > 0
        # Sliced from the release: most tensors come from it (a release's own odd widths may leave a few fresh).
        assert trial.user_attrs["inherited_fraction"] > 0.8
        cfg = load_student(trial.user_attrs["student_path"]).cfg
        assert cfg.max_disp <= release.cfg.max_disp and cfg.iters <= release.cfg.iters
    assert not (tmp_path / "parent").exists()  # a trained parent is not distilled again


def test_the_subnets_of_a_release_with_searched_blocks_all_build(tmp_path):
    release = import_fast_foundationstereo(DATA / "ffs" / "searched_variant" / "model_best_bp2_serialize.pth",
                                           tmp_path / "release")
    assert release.cfg.volume_blocks  # the release's searched cost-volume blocks
    space = subnet_space(release.cfg)
    a, b = _pair(2)
    for cfg in space.enumerate(limit=6):
        child, report = inherit_student(release, cfg)
        with torch.no_grad():
            assert torch.isfinite(child.eval()(a, b, test_mode=True)).all()
        assert report.fraction_inherited() > 0.5
