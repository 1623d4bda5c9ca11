"""One config per concept: the typed loader's errors, one LatencyConfig, one budget name, one data spec."""

from __future__ import annotations

import pytest
import yaml

from compress.data import DatasetSpec
from compress.distill.config import load_recipe
from compress.errors import ConfigError
from compress.latency import LatencyConfig
from compress.pipeline import load_run_recipe
from compress.pipeline.standin import load_standin_recipe
from compress.prune import build_samples, load_prune_config
from compress.structured import dump_yaml
from search_spaces import StudentConfig
from teacher import TeacherConfig
from tests.paths import REPO

RECIPES = REPO / "recipes"
QUICKSTART = RECIPES / "quickstart_cpu.yaml"


@pytest.mark.parametrize("override, suggestion", [
    ("search.latncy.mode=measured", "'latency'"),          # a close name at the same level
    ("prune.train_iters=2", "'prune.distill.train_iters'"),  # a key that lives one level down
    ("data.train.synthetic.heigt=64", "'height'"),
])
def test_unknown_keys_get_a_did_you_mean(override, suggestion):
    with pytest.raises(ConfigError, match="(?i)did you mean") as err:
        load_run_recipe(QUICKSTART, [override])
    assert suggestion in str(err.value) and len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("old, new, value", [
    ("out", "run_dir", "runs/p"),
    ("mlflow", "tracking.enabled", "false"),
    ("tracking_uri", "tracking.uri", "sqlite:///x.db"),
    ("experiment", "tracking.experiment", "e"),
])
def test_a_renamed_key_names_its_new_name_in_a_file_and_in_an_override(tmp_path, old, new, value):
    with pytest.raises(ConfigError, match=f"^override: key '{old}' was renamed to '{new}'$"):
        load_prune_config(None, [f"{old}={value}"])
    recipe = tmp_path / "prune.yaml"
    recipe.write_text(f"{old}: {value}\n")
    with pytest.raises(ConfigError, match=f"prune recipe {recipe}: key '{old}' was renamed to '{new}'$"):
        load_prune_config(recipe)
    cfg = load_prune_config(None, [f"{new}={value}"])  # the new key reads what the old one did
    assert str(cfg.run_dir if new == "run_dir" else getattr(cfg.tracking, new.split(".")[1])).lower() == value


@pytest.mark.parametrize("load, old, new, value", [
    (load_run_recipe, "data.labels.iters", "teacher.iters", "2"),
    (load_run_recipe, "prune.distill.teacher_iters", "teacher.iters", "2"),
    (load_run_recipe, "data.labels.size", "data.size", "[64,128]"),
    (load_recipe, "teacher.cache.iters", "teacher.iters", "2"),
    (load_recipe, "teacher.cache.size", "data.size", "[64,128]"),
    (load_prune_config, "distill.teacher_iters", "teacher_iters", "2"),
])
def test_the_teachers_iterations_and_the_label_size_have_one_key_each(load, old, new, value):
    with pytest.raises(ConfigError, match=f"^override: key '{old}' was renamed to '{new}'$"):
        load(None, [f"{old}={value}"])
    teacher = ["teacher.label_cache=labels"] if load is load_recipe else []  # a distill run needs its labels
    cfg = load(None, [*teacher, f"{new}={value}"])  # the new key reads what the old one did
    got = cfg
    for part in new.split("."):
        got = getattr(got, part)
    assert str(got).replace(" ", "") == value


def test_a_crop_and_a_label_size_stay_two_keys():
    recipe = load_run_recipe(QUICKSTART, ["data.size=[64,128]", "data.crop_size=[32,64]"])
    assert (recipe.data.size, recipe.data.crop_size) == ([64, 128], [32, 64])
    with pytest.raises(ConfigError, match=r"^data.size: got \[60, 128\], expected \[height, width\]"):
        load_run_recipe(QUICKSTART, ["data.size=[60,128]"])


def test_every_recipe_spells_tracking_and_the_output_folder_alike():
    from compress.pipeline.recipe import RunRecipe
    from compress.prune.config import PruneConfig
    from compress.tracking import TrackingConfig

    assert RunRecipe().tracking == PruneConfig().tracking == TrackingConfig()
    assert {"run_dir", "tracking"} <= set(vars(PruneConfig())) and hasattr(RunRecipe(), "run_dir")
    with pytest.raises(ConfigError, match="^tracking.enabled=false: `ffsc run` records the search in MLflow"):
        load_run_recipe(QUICKSTART, ["tracking.enabled=false"])
    prune = load_prune_config(RECIPES / "prune_to_budget.yaml")  # the shipped recipe uses the new keys
    assert prune.run_dir == "runs/prune/fast_foundationstereo" and prune.tracking.enabled


def test_student_and_teacher_configs_read_through_the_same_loader(tmp_path):
    with pytest.raises(ConfigError, match="unknown field.*hiden_dim; did you mean 'hidden_dim'"):
        StudentConfig.from_dict({"hiden_dim": 64})
    (tmp_path / "cfg.yaml").write_text("vit_size: vits\nvalid_iters: 8\nofficial_only_key: 1\n")
    assert TeacherConfig.from_yaml(tmp_path / "cfg.yaml").vit_size == "vits"  # official extra keys ignored
    with pytest.raises(ConfigError, match="beside the checkpoint"):
        TeacherConfig.from_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="should be a YAML mapping"):
        StudentConfig.from_yaml(tmp_path / "list.yaml")


def test_one_latency_config_for_search_prune_and_the_table():
    recipe = load_run_recipe(QUICKSTART, ["height=96", "search.latency.clock=thread", "search.latency.threads=1"])
    lat = recipe.search.latency
    assert isinstance(lat, LatencyConfig) and (lat.height, lat.width) == (96, 128)  # the working size
    assert lat.timing()["clock"] == "thread" and lat.timing()["intra_op_threads"] == 1
    assert load_run_recipe(QUICKSTART, ["search.latency.height=480"]).search.latency.height == 480
    prune = load_prune_config(None, ["latency.backend=torch", "budget_gmacs=1"])
    assert isinstance(prune.latency, LatencyConfig) and (prune.latency.height, prune.latency.width) == (480, 640)
    with pytest.raises(ConfigError, match="latency.clock"):
        load_run_recipe(QUICKSTART, ["search.latency.clock=sundial"])
    with pytest.raises(ConfigError, match="latency.mode"):
        load_prune_config(None, ["latency.mode=guessed"])


def test_budget_has_one_name_from_recipe_to_report():
    recipe = load_run_recipe(QUICKSTART, ["prune.ratio=null", "prune.budget_ms=5", "search.budget_ms=9"])
    assert recipe.prune.budget == ("latency_ms", 5.0) and recipe.search.budget_ms == 9.0
    assert load_prune_config(None, ["budget_ms=5"]).budget == ("latency_ms", 5.0)
    with pytest.raises(ConfigError, match="set exactly one of budget_ms"):
        load_prune_config(None, ["budget_ms=5", "ratio=0.5"])
    with pytest.raises(ConfigError, match="prune.enabled needs one of prune.budget_ms"):
        load_run_recipe(QUICKSTART, ["prune.ratio=null"])
    from compress.pipeline.search import study_spec

    assert study_spec(recipe).budget_ms == 9.0


def test_resolved_recipes_round_trip_through_yaml(tmp_path):
    recipe = load_run_recipe(QUICKSTART, ["data.train.synthetic.object_size=[0.1,0.3]"])
    assert recipe.data.train.synthetic.object_size == (0.1, 0.3)  # the generator's own config, tuples and all
    dump_yaml(recipe, tmp_path / "recipe.yaml")
    assert load_run_recipe(tmp_path / "recipe.yaml") == recipe
    distill = load_recipe(RECIPES / "distill.yaml")
    dump_yaml(distill, tmp_path / "distill.yaml")
    assert load_recipe(tmp_path / "distill.yaml") == distill
    prune = load_prune_config(RECIPES / "prune_to_budget.yaml")
    dump_yaml(prune, tmp_path / "prune.yaml")
    assert load_prune_config(tmp_path / "prune.yaml") == prune
    assert yaml.safe_load((tmp_path / "prune.yaml").read_text())["budget_ms"] == 25.0


def test_prune_data_is_a_dataset_spec():
    cfg = load_prune_config(None, ["budget_gmacs=1", "data.num_samples=2", "data.size=[32,64]",
                                   "data.synthetic.height=64", "data.synthetic.width=96"])
    assert isinstance(cfg.data, DatasetSpec) and cfg.data.kind == "auto" and cfg.data.path is None
    samples = build_samples(cfg)
    assert len(samples) == 2 and tuple(samples[0]["left"].shape) == (3, 32, 64)  # auto without a path: synthetic
    with pytest.raises(ConfigError, match="needs a path"):
        DatasetSpec(kind="middlebury")


def test_the_search_proxy_defaults_to_inheritance_and_distill_stays_selectable():
    # benchmarks/search_quality.py: inheritance ranks students like their final accuracy (tau 0.70 vs 0.42).
    assert load_run_recipe(None).search.proxy == "inherit"
    gpu = load_run_recipe(RECIPES / "fast_foundationstereo_nas.yaml").search
    assert gpu.proxy == "inherit" and gpu.parent_steps == 10 * gpu.distill_steps  # the benchmarked ratio
    quick = load_run_recipe(QUICKSTART).search
    assert quick.proxy == "inherit" and quick.parent_steps > quick.distill_steps  # shorter: the 5-minute goal
    assert load_run_recipe(QUICKSTART, ["search.proxy=distill"]).search.proxy == "distill"
    with pytest.raises(ConfigError, match="parent_steps: got 0"):
        load_run_recipe(QUICKSTART, ["search.parent_steps=0"])


@pytest.mark.parametrize("load, old, new", [
    (load_prune_config, "distill.lr", "distill.optim.lr"),
    (load_prune_config, "distill.grad_clip", "distill.optim.grad_clip"),
    (load_run_recipe, "teacher.train_lr", "teacher.optim.lr"),
    (load_run_recipe, "prune.distill.lr", "prune.distill.optim.lr"),
    (load_run_recipe, "prune.distill.grad_clip", "prune.distill.optim.grad_clip"),
    (load_standin_recipe, "lr", "optim.lr"),
    (load_standin_recipe, "weight_decay", "optim.weight_decay"),
    (load_standin_recipe, "grad_clip", "optim.grad_clip"),
])
def test_every_optimiser_key_moved_under_optim(load, old, new):
    """One key per optimiser setting in every recipe that trains: its ``optim`` section."""
    with pytest.raises(ConfigError, match=f"^override: key '{old}' was renamed to '{new}'$"):
        load(None, [f"{old}=1e-3"])
    cfg = load(None, [f"{new}=1e-3"])  # the new key reads what the old one did
    section = cfg.prune.distill if old.startswith("prune.") else getattr(cfg, old.split(".")[0], cfg)
    assert getattr(section.optim, new.rsplit(".", 1)[1]) == 1e-3
